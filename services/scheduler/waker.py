"""Wakes the workers when jobs are created: PostgreSQL NOTIFY in, NATS out.

The jobs table's insert trigger notifies once per inserting statement; this
turns each notification into one message on the wake subject, and every worker
with a free slot claims at once instead of at its next poll. Losing either
signal costs at most WORKER_POLL_INTERVAL: workers poll anyway.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from nats.aio.client import Client
from orchestrix import broker
from orchestrix.db.pool import TRANSIENT
from orchestrix.settings import NatsSettings

log = logging.getLogger("scheduler")
CHANNEL = "orchestrix_jobs"


class Waker:
    def __init__(self, url: str, nc: Client, nats: NatsSettings) -> None:
        self._url = url
        self._nc = nc
        self._subject = broker.wake_subject(nats)
        self._conn: asyncpg.Connection | None = None
        self.woken = 0

    def _notified(self, *args: Any) -> None:
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        try:
            await self._nc.publish(self._subject, b"")
            self.woken += 1
        except Exception as exc:  # NATS away: the workers' poll covers for it
            log.debug("wake-up not sent", extra={"error": repr(exc)})

    async def run_once(self) -> bool:
        """LISTEN, if not already; True while listening."""
        if self._conn is not None and not self._conn.is_closed():
            return True
        try:
            self._conn = await asyncpg.connect(self._url, timeout=5)
            await self._conn.add_listener(CHANNEL, self._notified)
        except TRANSIENT as exc:
            self._conn = None
            log.warning("cannot LISTEN; workers poll meanwhile", extra={"error": repr(exc)})
            return False
        # Jobs may have been created while no one listened.
        await self._wake()
        return True

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
