"""Deletes finished jobs once their state's retention has passed (``RETENTION_*``).

Run by the scheduler that holds the maintenance lock, beside (not inside) the
maintenance round: a long prune must not delay the lifeline, whose looks must
come every ``LOOK_EVERY_S``. Only the leader prunes so that two schedulers do
not do the same work; two that briefly both believe they lead (one lost its
connection and has not noticed yet) do no harm, as each batch skips the rows
another holds.

A run deletes at most ``max_per_run`` jobs, in batches of ``batch_size`` (one
short transaction each, see ``orchestrix.db.retention``), oldest first within a
state. Between batches it pauses ``pace`` times as long as the last batch took
(at least ``pause_s``), so it keeps the database busy at most 1 / (1 + pace) of
the time and the claims and state changes of the workers get the rest: a
pruner racing through a backlog of a million finished jobs cost a drain beside
it up to 17 %. At a pace of 5 it still deletes about 7,000 rows/s beside a
drain that keeps the machine busy (a row costs 11 µs of PostgreSQL's time
since migration 0016), seven times what 1,000 new jobs/s need. A batch slowed
by a busy database is followed by a longer pause, so the pruner yields most
when the fleet needs the database most. A run that reached its cap is followed
by another at once (after the pause); otherwise the next run comes
``interval_s`` later. A scheduler that becomes the leader prunes at once.
When nothing is due, a run is one cheap index probe per state.
``docs/performance.md`` has the measured rate and what it costs a drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import retention as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import RetentionSettings
from orchestrix.states import JobState

log = logging.getLogger("scheduler")
BATCH_SIZE = 1_000
MAX_PER_RUN = 20_000
PAUSE_S = 0.02
# The pause after a batch, in multiples of the time the batch took.
PACE = 5.0
INTERVAL_S = 5.0
# How often the loop looks whether this scheduler leads (and a run is due).
LOOK_S = 0.5


class Pruner:
    def __init__(
        self,
        pool: Any,
        retention: RetentionSettings,
        metrics: SchedulerMetrics,
        *,
        batch_size: int = BATCH_SIZE,
        max_per_run: int = MAX_PER_RUN,
        pause_s: float = PAUSE_S,
        pace: float = PACE,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._batch_size = batch_size
        self._max_per_run = max_per_run
        self._pause_s = pause_s
        self._pace = pace
        # The pause the last batch earned: also kept between a capped run and the next.
        self._next_pause_s = 0.0
        # States kept forever (retention 0) are never looked at.
        self._ages = {
            state: age
            for state, age in (
                (JobState.SUCCEEDED, retention.succeeded_s),
                (JobState.FAILED, retention.failed_s),
                (JobState.CANCELLED, retention.cancelled_s),
            )
            if age > 0
        }

    @property
    def enabled(self) -> bool:
        return bool(self._ages)

    async def run_once(self) -> dict[JobState, int]:
        """Delete what is due, up to ``max_per_run`` jobs; how many of each state.

        The states take turns, a batch each, so a backlog of one does not starve
        the others.
        """
        deleted = dict.fromkeys(self._ages, 0)
        left = self._max_per_run
        pending = list(self._ages)
        first = True
        while pending and left > 0:
            for state in list(pending):
                if left <= 0:
                    break
                if not first:
                    await asyncio.sleep(self._next_pause_s)
                first = False
                limit = min(self._batch_size, left)
                started = time.monotonic()
                count = await db.prune(self._pool, state, self._ages[state], limit)
                self._next_pause_s = self.pause_after(time.monotonic() - started)
                deleted[state] += count
                left -= count
                self._metrics.jobs_pruned.labels(state.value).inc(count)
                if count < limit:
                    pending.remove(state)  # nothing more of this state is due
        if any(deleted.values()):
            log.info(
                "finished jobs pruned",
                extra={state.value.lower(): count for state, count in deleted.items()},
            )
        return deleted

    def pause_after(self, batch_s: float) -> float:
        """How long to leave the database alone after a batch that took ``batch_s``."""
        return max(self._pause_s, self._pace * batch_s)

    def reached_cap(self, deleted: dict[JobState, int]) -> bool:
        return sum(deleted.values()) >= self._max_per_run

    async def run(
        self, stop: asyncio.Event, leading: Callable[[], bool], interval_s: float = INTERVAL_S
    ) -> None:
        """Prune every ``interval_s`` while ``leading()`` says this scheduler leads:
        at once when it starts to lead, and again at once after a run that reached
        its cap."""
        if not self.enabled:
            log.info("retention off for every state: finished jobs are kept")
            return
        look_s = min(interval_s, LOOK_S)
        ran_at = float("-inf")
        wait_s = look_s
        while not await sleep_unless_stopped(stop, wait_s):
            wait_s = look_s
            if not leading():
                ran_at = float("-inf")
                continue
            if time.monotonic() - ran_at < interval_s:
                continue
            ran_at = time.monotonic()
            try:
                deleted = await self.run_once()
            except TRANSIENT as exc:
                log.warning("finished jobs not pruned; retrying", extra={"error": repr(exc)})
                continue
            except Exception:
                log.exception("finished jobs not pruned")
                continue
            if self.reached_cap(deleted):
                wait_s, ran_at = self._next_pause_s, float("-inf")
