"""The settler: every scheduler cancels the waiting descendants of a workflow's
jobs that ended FAILED or CANCELLED.

A workflow's job that fails for good, or is cancelled, can never let its
descendants run: they wait (WAITING) for a parent that will not succeed. Each
round takes up to ``BATCH`` such jobs not yet settled (through
``jobs_unsettled_idx``, ``FOR UPDATE SKIP LOCKED``: any number of schedulers
take turns, never the same job), cancels every WAITING descendant, however
deep, naming the job in its ``last_error`` and ``cancelled_by``, and marks them
settled, in one statement (db.workflows.settle). An operator's retry of the job
brings those descendants back (db.workflows.retry).

A round comes every ``LOOK_EVERY_S``, and at once again while there is more.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import workflows as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.lifecycle import actor

log = logging.getLogger("scheduler")
LOOK_EVERY_S = 0.2
BATCH = 100


class Settler:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._actor = actor("settler")  # who cancelled the descendants, in their history

    async def run_once(self) -> tuple[int, int]:
        """One round: (jobs settled, descendants cancelled)."""
        settled, cancelled = await db.settle(self._pool, limit=BATCH, actor=self._actor)
        if cancelled:
            log.info(
                "descendants of failed workflow jobs cancelled",
                extra={"jobs": settled, "cancelled": cancelled},
            )
        return settled, cancelled

    async def run(self, stop: asyncio.Event) -> None:
        while not await sleep_unless_stopped(stop, LOOK_EVERY_S):
            try:
                while (await self.run_once())[0] == BATCH and not stop.is_set():
                    pass
            except TRANSIENT as exc:
                log.warning("workflows not settled; retrying", extra={"error": repr(exc)})
            except Exception:
                log.exception("workflows not settled")
