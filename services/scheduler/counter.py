"""Folds the job count deltas into ``job_counts`` (orchestrix.db.counts), every second.

Run by the scheduler that holds the maintenance lock, beside the maintenance
round like the pruner. The counts that ``GET /api/v1/stats`` reads are exact
whether or not this runs (they add the deltas not folded yet); what the fold
bounds is the read's cost: a second's deltas, one row per (queue, type, state)
per statement that changed it. With no leading scheduler the deltas pile up
and the read slows down, but it does not go wrong; the next leader folds them,
``batch_size`` at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import counts as db
from orchestrix.db.pool import TRANSIENT

log = logging.getLogger("scheduler")
BATCH_SIZE = 50_000
INTERVAL_S = 1.0


class CountFolder:
    def __init__(self, pool: Any, *, batch_size: int = BATCH_SIZE) -> None:
        self._pool = pool
        self._batch_size = batch_size

    async def run_once(self) -> int:
        """Fold every delta committed by now, a batch per transaction; how many."""
        total = 0
        async with self._pool.acquire() as conn:
            while True:
                folded = await db.fold(conn, self._batch_size)
                if folded is None:  # another scheduler folds
                    break
                total += folded
                if folded < self._batch_size:
                    break
        return total

    async def run(
        self, stop: asyncio.Event, leading: Callable[[], bool], interval_s: float = INTERVAL_S
    ) -> None:
        """Fold every ``interval_s`` while ``leading()`` says this scheduler leads."""
        while not await sleep_unless_stopped(stop, interval_s):
            if not leading():
                continue
            try:
                await self.run_once()
            except TRANSIENT as exc:
                log.warning("job counts not folded; retrying", extra={"error": repr(exc)})
            except Exception:
                log.exception("job counts not folded")
