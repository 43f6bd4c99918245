"""Starting and stopping a service process: the stop signal and the connections it waits for."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
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


def actor(role: str) -> str:
    """This process as the jobs' history names it (``role:host:pid``): the
    ``application_name`` of its database sessions too, so pg_stat_activity shows it."""
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


def session_settings(role: str, server_settings: dict[str, str] | None = None) -> dict[str, str]:
    """A pool's server settings with the process's application_name (see ``actor``)."""
    return {**(server_settings or {}), "application_name": actor(role)}


async def connect_both(
    settings: Settings,
    role: str,
    stop: asyncio.Event,
    *,
    server_settings: dict[str, str] | None = None,
) -> tuple[Any, Client] | None:
    """PostgreSQL pool and NATS connection, each waited for; None if stopped first.

    ``role`` ("worker", "scheduler") names the process to both servers.
    """
    pool = await connect_with_backoff(
        settings.database, stop, server_settings=session_settings(role, server_settings)
    )
    if pool is None:
        return None
    nc = await broker.connect_with_backoff(settings.nats, f"orchestrix-{role}", stop)
    if nc is None:
        await pool.close()
        return None
    return pool, nc
