"""The asyncpg connection pool every service opens, with JSON codecs installed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
import orjson

from orchestrix.settings import DatabaseSettings

log = logging.getLogger("db")

# Worth waiting out; anything else (a wrong password, a missing database) is not.
_NOT_THERE_YET = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)


def _encode(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb/json columns come back as Python values and go in from them."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=_encode, decoder=orjson.loads, format="text"
        )


async def create_pool(settings: DatabaseSettings, **overrides: Any) -> asyncpg.Pool:
    options: dict[str, Any] = {
        "min_size": settings.pool_min_size,
        "max_size": settings.pool_max_size,
        "init": init_connection,
        # Short enough that /ready notices a dead server quickly.
        "command_timeout": 30,
    }
    options.update(overrides)
    pool: asyncpg.Pool = await asyncpg.create_pool(settings.url, **options)
    return pool


async def connect_with_backoff(
    settings: DatabaseSettings,
    stop: asyncio.Event,
    *,
    first_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
) -> asyncpg.Pool | None:
    """Open the pool, retrying while PostgreSQL is not there yet; None if stopped first.

    A service started beside its database (compose, Kubernetes) should wait for
    it rather than crash-loop.
    """
    delay = first_delay_s
    while not stop.is_set():
        try:
            return await create_pool(settings)
        except _NOT_THERE_YET as exc:
            log.warning(
                "database not reachable; retrying",
                extra={"error": repr(exc), "retry_in_s": round(delay, 2)},
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, max_delay_s)
    return None
