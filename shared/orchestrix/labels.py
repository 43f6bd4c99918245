"""Keeps a process's known label values (``metrics.KnownLabels``) up to date.

The API and the scheduler run no executors, so they learn which job types and
queues are real from the ``workers`` table: the types each live worker has
executors for, and the queues of its WORKER_QUEUES (a worker of every queue names
none). Workers follow it too, so that a worker of every queue labels the queues
other workers name. A type or queue only a client has used stays ``other``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import workers
from orchestrix.metrics import KnownLabels

log = logging.getLogger("metrics")

# A new worker's types get their own series within this long; until then they
# count as other.
REFRESH_INTERVAL_S = 10.0


class LabelFollower:
    def __init__(self, pool: Any, known: KnownLabels) -> None:
        self._pool = pool
        self._known = known

    async def run_once(self) -> None:
        served = await workers.served(self._pool)
        for queues, types in served.pairs:
            self._known.learn(sorted(types), sorted(queues or ()))

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:  # the database away: the known values stay as they are
                log.warning("known label values not refreshed", extra={"error": repr(exc)})
            await sleep_unless_stopped(stop, REFRESH_INTERVAL_S)
