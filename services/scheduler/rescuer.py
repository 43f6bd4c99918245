"""Takes back running jobs whose worker stopped renewing their lease.

A worker that cannot renew a lease stops that attempt before the lease runs out
(services/worker/heartbeat.py), so once it has, no one runs the attempt and the
rescuer may take it at once. A lost attempt counts as failed: the job goes to
RETRYING after the retry policy's backoff, or to FAILED when its attempts are
used up (CANCELLED if a user asked for that).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from orchestrix import retry
from orchestrix.db import jobs as db
from orchestrix.errors import Kind
from orchestrix.lifecycle import actor
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import RecoverySettings, RetrySettings
from orchestrix.states import JobState

log = logging.getLogger("scheduler")
BATCH = 1000
# Past the lease's end, for clocks that drift: the worker stopped the attempt a
# margin before it (by its own clock).
GRACE_S = 1.0
WORKER_LOST = "WorkerLost: the worker running this attempt stopped renewing its lease"


def decide(
    lost: Sequence[db.Lost], retry_settings: RetrySettings, *, delay: bool = True
) -> list[tuple[db.Lost, JobState, float]]:
    """What becomes of each lost attempt: the retry policy's decision, or CANCELLED.

    ``delay`` False makes a retried job due at once (its worker died: the job
    itself did not fail).
    """
    decisions = []
    for job in lost:
        if job.cancel_requested:
            decisions.append((job, JobState.CANCELLED, 0.0))
            continue
        decision = retry.decide(
            Kind.RETRYABLE,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            base_s=retry_settings.base_delay_s,
            max_s=retry_settings.max_delay_s,
            jitter=random.random(),
        )
        if isinstance(decision, retry.Retry):
            decisions.append((job, JobState.RETRYING, decision.delay_s if delay else 0.0))
        else:
            decisions.append((job, JobState.FAILED, 0.0))
    return decisions


class Rescuer:
    def __init__(
        self,
        pool: Any,
        recovery: RecoverySettings,
        retry_settings: RetrySettings,
        metrics: SchedulerMetrics,
    ) -> None:
        self._pool = pool
        self._recovery = recovery
        self._retry = retry_settings
        self._metrics = metrics
        self._actor = actor("rescuer")  # who took the attempts back, in their history

    async def run_once(self) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            lost = await db.lost_by_lease(conn, limit=BATCH, grace_s=GRACE_S)
            rescued = await db.take_back(
                conn, decide(lost, self._retry), WORKER_LOST, actor=self._actor
            )
        for job in rescued:
            queue = self._metrics.known.queue(job.queue)
            self._metrics.jobs_rescued.labels(queue, job.state.value).inc()
            log.warning(
                "lease expired; job rescued",
                extra={"job_id": job.id, "attempt": job.attempt, "state": job.state.value},
            )
        return len(rescued)
