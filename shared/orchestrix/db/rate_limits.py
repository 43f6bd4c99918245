"""Every query on the ``rate_limits`` table: named token buckets that jobs' starts
take from (the limited claim, db.concurrency, spends the tokens).

A bucket is stored as the last start that took from it left it (``tokens`` at
``refilled_at``); what it holds at a moment t is
``least(burst, tokens + per_second * (t - refilled_at))``. A new bucket starts
full. A change brings the bucket up to now with its old rate, then caps it at
the new burst; it takes the limited claims' turn (``KEYED_LOCK``) so that no
claim spends tokens by the old figures after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix.db.concurrency import KEYED_LOCK
from orchestrix.models import rfc3339
from orchestrix.states import TERMINAL, JobState

Conn = Any

_AVAILABLE = (
    "least(burst::float8, tokens + per_second"
    " * greatest(0, extract(epoch FROM clock_timestamp() - refilled_at)))"
)
_COLUMNS = f"name, per_second, burst, {_AVAILABLE} AS available, created_at, updated_at"

_CREATE = f"""
INSERT INTO rate_limits (name, per_second, burst, tokens) VALUES ($1, $2, $3::int, $3::int)
ON CONFLICT (name) DO NOTHING
RETURNING {_COLUMNS}
"""

_GET = f"SELECT {_COLUMNS} FROM rate_limits WHERE name = $1"

_LIST = f"SELECT {_COLUMNS} FROM rate_limits ORDER BY name"

# $2 / $3 NULL: unchanged.
_CHANGE = f"""
UPDATE rate_limits
SET tokens = least(coalesce($3::int, burst)::float8, {_AVAILABLE}),
    refilled_at = greatest(refilled_at, clock_timestamp()),
    per_second = coalesce($2, per_second), burst = coalesce($3, burst), updated_at = now()
WHERE name = $1
RETURNING {_COLUMNS}
"""

# Walks jobs_state_id_idx over the unfinished states only.
_IN_USE = """
SELECT count(*) FROM jobs WHERE state = ANY($2::text[]) AND rate_limit = $1
"""

_DELETE = "DELETE FROM rate_limits WHERE name = $1 RETURNING name"

_KNOWN = "SELECT name FROM rate_limits WHERE name = ANY($1::text[])"

UNFINISHED = [state.value for state in JobState if state not in TERMINAL]


@dataclass(frozen=True)
class RateLimit:
    name: str
    per_second: float
    burst: int
    available: float  # tokens in the bucket now
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> RateLimit:
        return cls(
            row["name"],
            row["per_second"],
            row["burst"],
            row["available"],
            row["created_at"],
            row["updated_at"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "per_second": self.per_second,
            "burst": self.burst,
            "available": round(self.available, 3),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }


async def create(conn: Conn, name: str, per_second: float, burst: int) -> RateLimit | None:
    """A new bucket, full; None when one of that name exists."""
    row = await conn.fetchrow(_CREATE, name, per_second, burst)
    return None if row is None else RateLimit.from_row(row)


async def get(conn: Conn, name: str) -> RateLimit | None:
    row = await conn.fetchrow(_GET, name)
    return None if row is None else RateLimit.from_row(row)


async def all_limits(conn: Conn) -> list[RateLimit]:
    return [RateLimit.from_row(row) for row in await conn.fetch(_LIST)]


async def change(
    pool: Any, name: str, *, per_second: float | None, burst: int | None
) -> RateLimit | None:
    """New figures for ``name`` (None: unchanged), in the limited claims' turn;
    None when there is no such limit."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", KEYED_LOCK)
        row = await conn.fetchrow(_CHANGE, name, per_second, burst)
    return None if row is None else RateLimit.from_row(row)


async def delete(pool: Any, name: str) -> int | None:
    """Delete ``name`` unless unfinished jobs name it: None when deleted (or there
    was none: see :func:`get`), else how many jobs name it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", KEYED_LOCK)
        in_use = await conn.fetchval(_IN_USE, name, UNFINISHED)
        if in_use:
            return int(in_use)
        await conn.fetchval(_DELETE, name)
    return None


async def unknown(conn: Conn, names: set[str]) -> list[str]:
    """Which of ``names`` no rate limit has, sorted."""
    if not names:
        return []
    known = {row["name"] for row in await conn.fetch(_KNOWN, sorted(names))}
    return sorted(names - known)
