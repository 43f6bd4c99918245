"""Which scheduler runs the periodic maintenance: the one holding a PostgreSQL advisory lock.

The lock belongs to a session, so it is held exactly as long as that scheduler's
connection lives: if the scheduler dies or loses the database, the lock is freed
and another scheduler takes it on its next try.
"""

from __future__ import annotations

import logging
import time

import asyncpg
from orchestrix.db.pool import TRANSIENT

log = logging.getLogger("scheduler")
# An arbitrary constant naming Orchestrix's maintenance lock in pg_locks.
MAINTENANCE_LOCK = 0x4F52_4358_4D41_494E  # "ORCXMAIN"


class Leadership:
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None
        self.since: float | None = None  # monotonic time leadership was (re)gained

    @property
    def leading(self) -> bool:
        """Whether the last ``held()`` found the lock ours; no I/O, for actors that
        run beside the maintenance round (the pruner)."""
        return self._conn is not None

    async def held(self) -> bool:
        """True while this scheduler holds the lock; tries to take it when free."""
        if self._conn is not None:
            try:
                await self._conn.fetchval("SELECT 1")
                return True
            except TRANSIENT:
                log.warning("maintenance leadership lost with the database connection")
                await self._drop()
        try:
            conn = await asyncpg.connect(self._url)
        except TRANSIENT:
            return False
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
            await conn.close()
            return False
        self._conn = conn
        self.since = time.monotonic()
        log.info("this scheduler now runs maintenance (lifeline, rescuer, pruner)")
        return True

    async def _drop(self) -> None:
        conn, self._conn, self.since = self._conn, None, None
        if conn is not None:
            conn.terminate()

    async def release(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()  # closing the session frees the lock
        self._conn = None
