"""Every query on the ``api_keys`` table (migration 0014).

Keys are made, listed and revoked by ``orchestrix keys`` on the database
directly: whoever may write this table is the root of trust. The API only reads
a key by its id (services/api/auth.py, which caches what it read for a few
seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from orchestrix import apikeys
from orchestrix.models import rfc3339

Conn = Any


class NameTaken(ValueError):
    """Another key (maybe a revoked one) has this name."""


@dataclass(frozen=True)
class KeyLimits:
    """A key's own limits; None leaves the API's setting, 0 is unlimited."""

    requests_per_s: float | None = None
    requests_burst: int | None = None
    jobs_per_s: float | None = None
    jobs_burst: int | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    secret_sha256: bytes
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    limits: KeyLimits

    @classmethod
    def from_row(cls, row: Any) -> ApiKey:
        return cls(
            id=row["id"],
            name=row["name"],
            scopes=tuple(row["scopes"]),
            secret_sha256=bytes(row["secret_sha256"]),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            limits=KeyLimits(
                row["requests_per_s"], row["requests_burst"], row["jobs_per_s"], row["jobs_burst"]
            ),
        )

    def to_json(self) -> dict[str, Any]:
        """What ``keys list`` shows: never the digest."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "revoked_at": rfc3339(self.revoked_at),
            "requests_per_s": self.limits.requests_per_s,
            "requests_burst": self.limits.requests_burst,
            "jobs_per_s": self.limits.jobs_per_s,
            "jobs_burst": self.limits.jobs_burst,
        }


_INSERT = """
INSERT INTO api_keys (id, name, scopes, secret_sha256, expires_at,
                      requests_per_s, requests_burst, jobs_per_s, jobs_burst)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6, $7, $8, $9)
RETURNING *
"""
_BY_ID = "SELECT * FROM api_keys WHERE id = $1"
_ALL = "SELECT * FROM api_keys ORDER BY id"
_REVOKE = """
UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
WHERE id = $1 OR name = $1
RETURNING *
"""


async def create(
    conn: Conn,
    name: str,
    scopes: Sequence[str],
    *,
    expires_in_s: float | None = None,
    limits: KeyLimits = KeyLimits(),
) -> tuple[ApiKey, str]:
    """A new key and its secret, which exists nowhere else: show it once."""
    key_id, token, digest = apikeys.new_key()
    try:
        row = await conn.fetchrow(
            _INSERT,
            key_id,
            name,
            list(scopes),
            digest,
            expires_in_s,
            limits.requests_per_s,
            limits.requests_burst,
            limits.jobs_per_s,
            limits.jobs_burst,
        )
    except asyncpg.UniqueViolationError:
        raise NameTaken(f"a key named {name!r} exists (revoked keys keep their names)") from None
    return ApiKey.from_row(row), token


async def get(conn: Conn, key_id: str) -> ApiKey | None:
    row = await conn.fetchrow(_BY_ID, key_id)
    return None if row is None else ApiKey.from_row(row)


async def list_all(conn: Conn) -> list[ApiKey]:
    return [ApiKey.from_row(row) for row in await conn.fetch(_ALL)]


async def revoke(conn: Conn, name_or_id: str) -> ApiKey | None:
    """Revoke the key of that name or id (a revoked one stays as it was); None if none."""
    row = await conn.fetchrow(_REVOKE, name_or_id)
    return None if row is None else ApiKey.from_row(row)
