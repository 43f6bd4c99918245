"""Writes the state an attempt ends in, following the retry policy.

Every write is conditional on the job still being RUNNING this attempt; zero rows
means someone else moved it first (e.g. a cancel), and that stands.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import asyncpg
from orchestrix import retry
from orchestrix.db import jobs as db
from orchestrix.errors import Kind
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.settings import WorkerSettings

from services.worker.runner import Failure, Outcome, Success

log = logging.getLogger("worker")


class Completer:
    def __init__(self, pool: Any, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics

    async def record(self, job: Job, outcome: Outcome) -> Job | None:
        """Write the outcome; the job as written, or None when it had moved on."""
        labels = (job.type, job.queue)
        if isinstance(outcome, Success):
            try:
                written = await db.succeed(self._pool, job.id, job.attempt, outcome.result)
            except (asyncpg.DataError, asyncpg.UntranslatableCharacterError) as exc:
                # JSON that PostgreSQL refuses (e.g. a U+0000 inside a string).
                outcome = Failure(
                    f"InvalidResult: the result cannot be stored: {exc}", Kind.PERMANENT
                )
            else:
                if written is not None:
                    self._metrics.jobs_succeeded.labels(*labels).inc()
                    log.info("job succeeded", extra={"job_id": job.id, "attempt": job.attempt})
                return written
        assert isinstance(outcome, Failure)
        decision = retry.decide(
            outcome.kind,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            base_s=self._settings.retry_base_delay_s,
            max_s=self._settings.retry_max_delay_s,
            jitter=random.random(),
        )
        extra = {"job_id": job.id, "attempt": job.attempt, "error": outcome.error}
        if isinstance(decision, retry.Retry):
            written = await db.retry(
                self._pool, job.id, job.attempt, outcome.error, decision.delay_s
            )
            if written is not None:
                self._metrics.jobs_retried.labels(*labels).inc()
                log.warning(
                    "job attempt failed; retrying",
                    extra={**extra, "retry_in_s": round(decision.delay_s, 3)},
                )
            return written
        written = await db.fail(self._pool, job.id, job.attempt, outcome.error)
        if written is not None:
            self._metrics.jobs_failed.labels(*labels).inc()
            log.warning("job failed", extra={**extra, "kind": outcome.kind.value})
        return written
