"""Takes back running jobs whose worker stopped renewing their lease.

A lost attempt counts as failed: the job goes to RETRYING with backoff, or to
FAILED when its attempts are used up (CANCELLED if a user asked for that).
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import RecoverySettings, RetrySettings

log = logging.getLogger("scheduler")
BATCH = 1000
WORKER_LOST = "WorkerLost: the worker running this attempt stopped renewing its lease"


class Rescuer:
    def __init__(
        self,
        pool: Any,
        recovery: RecoverySettings,
        retry: RetrySettings,
        metrics: SchedulerMetrics,
    ) -> None:
        self._pool = pool
        self._recovery = recovery
        self._retry = retry
        self._metrics = metrics

    async def run_once(self) -> int:
        rescued = await db.rescue_expired(
            self._pool,
            limit=BATCH,
            # Half a lease more: a live worker renews every third of a lease, so by
            # then it has missed at least four renewals in a row.
            grace_s=self._recovery.lease_timeout_s / 2,
            error=WORKER_LOST,
            base_s=self._retry.base_delay_s,
            max_s=self._retry.max_delay_s,
        )
        for job in rescued:
            self._metrics.jobs_rescued.labels(job.queue, job.state.value).inc()
            log.warning(
                "worker lost; job rescued",
                extra={"job_id": job.id, "attempt": job.attempt, "state": job.state.value},
            )
        return len(rescued)
