"""The asyncpg connection pool every service opens, with JSON codecs installed."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import asyncpg
import orjson

from orchestrix.backoff import until_connected
from orchestrix.settings import DatabaseSettings
from orchestrix.transport import Refused

log = logging.getLogger("database")

# The server is away or busy: worth waiting out, and answered with 503 meanwhile.
# Anything else (a wrong password, a missing database) is not.
RETRYABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)


# For a service's own loops, which retry rather than answer anyone: asyncpg also
# raises InterfaceError or InternalClientError ("cannot switch to state 12;
# another operation is in progress") for a connection that broke mid-operation.
TRANSIENT = (*RETRYABLE, asyncpg.InterfaceError, asyncpg.InternalClientError)


def encode_json(value: Any) -> str:
    """A value as the text PostgreSQL reads into a json or jsonb column."""
    return orjson.dumps(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb/json columns come back as Python values and go in from them."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=encode_json, decoder=orjson.loads, format="text"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool.

    asyncpg's default runs ``RESET ALL`` and friends on every release: a round
    trip per query. No code here changes session state on a pooled connection
    (LISTEN and advisory locks use connections of their own), and asyncpg still
    rolls back a transaction left open.
    """


async def create_pool(settings: DatabaseSettings, **overrides: Any) -> asyncpg.Pool:
    options: dict[str, Any] = {
        "min_size": settings.pool_min_size,
        "max_size": settings.pool_max_size,
        "init": init_connection,
        "reset": _keep_session,
        # Short enough that /ready notices a dead server quickly.
        "command_timeout": 30,
    }
    options.update(overrides)
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(settings.url, **options)
    except REFUSED as exc:
        raise refusal(exc) from None
    return pool


# The server and we do not accept each other: waiting cannot fix it. (An
# SSLCertVerificationError is an OSError, which RETRYABLE would wait out.)
REFUSED = (ssl.SSLCertVerificationError, asyncpg.InvalidAuthorizationSpecificationError)


def refusal(exc: BaseException) -> Refused:
    """``exc`` as the one-line Refused a process stops with (asyncpg's messages
    name the user and host, never the password)."""
    return Refused(f"PostgreSQL refused the connection: {type(exc).__name__}: {exc}")


async def connect_with_backoff(
    settings: DatabaseSettings, stop: asyncio.Event, **overrides: Any
) -> asyncpg.Pool | None:
    """Open the pool once PostgreSQL answers; None if stopped first."""
    try:
        return await until_connected(
            lambda: create_pool(settings, **overrides),
            what="database",
            stop=stop,
            retry_on=RETRYABLE,
        )
    except Refused as exc:
        log.error("database refused; not retrying", extra={"error": str(exc)})
        raise
