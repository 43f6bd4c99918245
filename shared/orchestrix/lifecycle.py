"""Starting and stopping a service process: the stop signal and the connections it waits for."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from nats.aio.client import Client

from orchestrix import broker
from orchestrix.db.pool import connect_with_backoff
from orchestrix.settings import Settings


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: the start of a graceful shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def connect_both(
    settings: Settings, name: str, stop: asyncio.Event, **pool_options: Any
) -> tuple[Any, Client] | None:
    """PostgreSQL pool and NATS connection, each waited for; None if stopped first."""
    pool = await connect_with_backoff(settings.database, stop, **pool_options)
    if pool is None:
        return None
    nc = await broker.connect_with_backoff(settings.nats, name, stop)
    if nc is None:
        await pool.close()
        return None
    return pool, nc
