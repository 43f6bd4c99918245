"""API keys as text: their scopes, how a secret is made, read back and checked. No I/O.

A key's secret is ``orx_<id>_<random>``: the prefix makes a leaked key easy to
recognise (secret scanners, logs); ``<id>`` is the key's row (a ULID), so a
request's key is found by primary key, never by searching hashes; ``<random>``
is 32 bytes from :mod:`secrets`, base64url. Only SHA-256 of the whole text is
stored. A slow password hash (bcrypt, scrypt, argon2) exists to make guessing
low-entropy passwords expensive; a 256-bit random secret cannot be guessed
however fast the hash is, and a fast hash lets the API check a key on every
request in about a microsecond. The stored digest is compared in constant time
(:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from orchestrix import ids

PREFIX = "orx_"
SECRET_BYTES = 32

# What each scope lets a key do (services/api/auth.py maps every route to one).
JOBS_READ = "jobs:read"  # read jobs, their events, stats, queues, workflows, schedules
JOBS_WRITE = "jobs:write"  # create jobs and workflows; retry or run one job now
JOBS_CANCEL = "jobs:cancel"  # cancel one job
METRICS_READ = "metrics:read"  # /ready and /metrics, when they are not open
ADMIN = "admin"  # everything: bulk actions, queues, schedules, deleting workflows
SCOPES = (JOBS_READ, JOBS_WRITE, JOBS_CANCEL, METRICS_READ, ADMIN)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# orx_, a ULID, _, 43 base64url characters (32 bytes, unpadded).
_TOKEN = re.compile(r"^orx_([0-7][0-9A-HJKMNP-TV-Z]{25})_([A-Za-z0-9_-]{43})$")


def digest(token: str) -> bytes:
    """What is stored of a key: SHA-256 of its whole text."""
    return hashlib.sha256(token.encode()).digest()


def new_key() -> tuple[str, str, bytes]:
    """A new key: its id, its secret (shown once) and the digest to store."""
    key_id = ids.new_id()
    random = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    token = f"{PREFIX}{key_id}_{random}"
    return key_id, token, digest(token)


def key_id_of(token: str) -> str | None:
    """The key id a well-formed secret names; None for anything else."""
    match = _TOKEN.match(token)
    return None if match is None else match.group(1)


def matches(token: str, stored: bytes) -> bool:
    """Whether ``token`` is the key whose digest is ``stored``, in constant time."""
    return hmac.compare_digest(digest(token), stored)


def parse_scopes(text: str) -> tuple[str, ...]:
    """Comma-separated scopes, each one of SCOPES; ValueError naming the bad one."""
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not scopes:
        raise ValueError(f"give at least one scope of {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}: use {', '.join(SCOPES)}")
    return scopes


def allows(scopes: frozenset[str], needed: str) -> bool:
    """Whether a key with ``scopes`` may do what needs ``needed`` (admin may do all)."""
    return needed in scopes or ADMIN in scopes
