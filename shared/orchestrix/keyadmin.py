"""``orchestrix keys``: create, list and revoke the API's keys, on the database directly.

``create`` prints the secret on stdout, alone on its line, and nowhere else ever
(``KEY=$(orchestrix keys create ...)``); what was made goes to stderr. ``list``
never shows a secret: the database has only its SHA-256. ``revoke`` takes effect
on every API process within API_KEY_CACHE_TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from orchestrix import apikeys
from orchestrix.db import api_keys as db
from orchestrix.settings import Settings, duration_seconds

# Ten years: far beyond any sensible key lifetime, short of overflowing a timestamp.
EXPIRES_MAX_S = 3650 * 86400.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="make a key and print its secret, once",
        description="Make a key and print its secret on stdout, once: only its hash is kept.",
    )
    create.add_argument("--name", required=True, help="unique name, [A-Za-z0-9_.-]{1,64}")
    create.add_argument(
        "--scopes",
        required=True,
        help="comma-separated, of: " + ", ".join(apikeys.SCOPES),
    )
    create.add_argument("--expires", metavar="DURATION", help="e.g. 90d, 12h (default: never)")
    for flag, kind, what in (
        ("--requests-per-s", float, "requests/s per API process (0: no limit)"),
        ("--requests-burst", int, "requests at once above that rate"),
        ("--jobs-per-s", float, "jobs created/s per API process (0: no limit)"),
        ("--jobs-burst", int, "jobs at once above that rate"),
    ):
        create.add_argument(flag, type=kind, metavar="N", help=f"{what}; default: the API's")
    listing = actions.add_parser(
        "list", help="every key, never a secret", description="Every key; never a secret."
    )
    listing.add_argument("--json", action="store_true", help="one JSON array")
    revoke = actions.add_parser(
        "revoke",
        help="revoke a key by name or id",
        description="Revoke a key: every API process refuses it within API_KEY_CACHE_TTL.",
    )
    revoke.add_argument("key", metavar="NAME_OR_ID")


class _Refused(Exception):
    pass


def _expires(text: str | None) -> float | None:
    if text is None:
        return None
    seconds = duration_seconds(text)
    if seconds is None or not 0 < seconds <= EXPIRES_MAX_S:
        raise _Refused(f"--expires must be a duration such as 90d or 12h, got {text!r}")
    return seconds


def _limits(args: argparse.Namespace) -> db.KeyLimits:
    for name in ("requests_per_s", "jobs_per_s"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1e9:
            raise _Refused(f"--{name.replace('_', '-')} must be from 0 to 1e9")
    for name in ("requests_burst", "jobs_burst"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 1_000_000_000:
            raise _Refused(f"--{name.replace('_', '-')} must be from 1 to 1000000000")
    return db.KeyLimits(args.requests_per_s, args.requests_burst, args.jobs_per_s, args.jobs_burst)


def _state(key: db.ApiKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def _table(keys: list[db.ApiKey]) -> str:
    now = datetime.now(UTC)
    rows = [("ID", "NAME", "SCOPES", "STATE", "CREATED", "EXPIRES")]
    for key in keys:
        shown = key.to_json()
        rows.append(
            (
                key.id,
                key.name,
                ",".join(key.scopes),
                _state(key, now),
                shown["created_at"][:19] + "Z",
                (shown["expires_at"][:19] + "Z") if shown["expires_at"] else "never",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    conn: Any = await asyncpg.connect(settings.database.url)
    try:
        if args.action == "create":
            if not apikeys.NAME_PATTERN.match(args.name):
                raise _Refused(f"--name must match {apikeys.NAME_PATTERN.pattern}")
            try:
                scopes = apikeys.parse_scopes(args.scopes)
            except ValueError as exc:
                raise _Refused(f"--scopes: {exc}") from None
            try:
                key, token = await db.create(
                    conn,
                    args.name,
                    scopes,
                    expires_in_s=_expires(args.expires),
                    limits=_limits(args),
                )
            except db.NameTaken as exc:
                raise _Refused(str(exc)) from None
            print(token, flush=True)
            expires = key.to_json()["expires_at"] or "never"
            print(
                f"created API key {key.name} (id {key.id}, scopes {','.join(key.scopes)}, "
                f"expires {expires}). The secret above is shown this once: only its "
                "SHA-256 is stored.",
                file=sys.stderr,
            )
        elif args.action == "list":
            keys = await db.list_all(conn)
            if args.json:
                print(orjson.dumps([key.to_json() for key in keys]).decode())
            else:
                print(_table(keys))
        else:
            revoked = await db.revoke(conn, args.key)
            if revoked is None:
                raise _Refused(f"no key has the name or id {args.key!r}")
            print(
                f"revoked API key {revoked.name} (id {revoked.id}); every API process "
                "refuses it within API_KEY_CACHE_TTL"
            )
    finally:
        await conn.close()
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_main(args, settings))
    except _Refused as exc:
        print(f"orchestrix keys {args.action}: {exc}", file=sys.stderr)
        return 2
