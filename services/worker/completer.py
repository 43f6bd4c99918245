"""Writes the state an attempt ends in, following the retry policy.

Every write is conditional on the job still being RUNNING this attempt; zero rows
means someone else moved it first (e.g. a cancel), and that stands. Successes,
the common case, are written in batches: one UPDATE for all the jobs of this
worker that finished while the previous write was in flight.

A failure is always written, so the job never stays RUNNING for the rescuer:
its error text is made storable first (``storable_error``), and should
PostgreSQL still refuse it, ``UNSTORABLE_ERROR`` is recorded in its place.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import asyncpg
from orchestrix import retry
from orchestrix.batching import Batcher
from orchestrix.db import jobs as db
from orchestrix.errors import UNSTORABLE_ERROR, Kind, storable_error
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.services.worker.runner import Failure, Outcome, Snoozed, Success
from orchestrix.settings import RetrySettings
from orchestrix.states import JobState

BATCH = 500

log = logging.getLogger("worker")


# What a batched success write says of one job: written (True), moved on (False),
# or refused by PostgreSQL (the reason).
Refused = str  # PostgreSQL refused this result; the reason


class Completer:
    def __init__(
        self,
        pool: Any,
        retry: RetrySettings,
        metrics: WorkerMetrics,
        *,
        worker_id: str | None = None,
    ) -> None:
        """``worker_id``: the worker whose runs these are; every write names it."""
        self._pool = pool
        self._worker_id = worker_id
        self._retry = retry
        self._metrics = metrics
        self._successes: Batcher[tuple[str, int, Any], bool | Refused] = Batcher(
            self._write_successes, max_size=BATCH
        )

    async def _write_successes(
        self, outcomes: Sequence[tuple[str, int, Any]]
    ) -> list[bool | Refused]:
        try:
            return list(await db.succeed_many(self._pool, outcomes, worker_id=self._worker_id))
        except asyncpg.DataError:
            pass
        # Some result PostgreSQL will not store (e.g. U+0000 in a string): find it
        # by writing one at a time, so the others still succeed.
        results: list[bool | Refused] = []
        for job_id, attempt, result in outcomes:
            try:
                written = await db.succeed(
                    self._pool, job_id, attempt, result, worker_id=self._worker_id
                )
                results.append(written is not None)
            except asyncpg.DataError as exc:
                results.append(f"InvalidResult: the result cannot be stored: {exc}")
        return results

    async def record(self, job: Job, outcome: Outcome) -> bool:
        """Write the outcome; False when the job had moved on and nothing was written."""
        labels = self._metrics.known.job(job.type, job.queue)
        if isinstance(outcome, Success):
            written = await self._successes.submit((job.id, job.attempt, outcome.result))
            if not isinstance(written, str):
                if written:
                    self._metrics.jobs_succeeded.labels(*labels).inc()
                    log.debug("job succeeded", extra={"job_id": job.id, "attempt": job.attempt})
                return written
            outcome = Failure(written, Kind.PERMANENT)
        if isinstance(outcome, Snoozed):
            return await self._snooze(job, outcome.delay_s)
        decision = retry.decide(
            outcome.kind,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            base_s=self._retry.base_delay_s,
            max_s=self._retry.max_delay_s,
            jitter=random.random(),
        )
        delay_s = decision.delay_s if isinstance(decision, retry.Retry) else None
        error = storable_error(outcome.error)
        extra = {"job_id": job.id, "attempt": job.attempt, "error": error}
        try:
            after = await self._write_failure(job, error, delay_s)
        except asyncpg.DataError as exc:
            log.error(
                "error text refused; recording a placeholder",
                extra={**extra, "refusal": repr(exc)},
            )
            after = await self._write_failure(job, UNSTORABLE_ERROR, delay_s)
        if after is None:
            return False
        if after.state is JobState.RETRYING:
            assert delay_s is not None  # only a retry leaves it RETRYING
            self._metrics.jobs_retried.labels(*labels).inc()
            log.warning(
                "job attempt failed; retrying", extra={**extra, "retry_in_s": round(delay_s, 3)}
            )
        elif after.state is JobState.CANCELLED:
            self._metrics.jobs_cancelled.labels(*labels).inc()
            log.info("job attempt failed; cancelled as requested instead of retried", extra=extra)
        else:
            self._metrics.jobs_failed.labels(*labels).inc()
            log.warning("job failed", extra={**extra, "kind": outcome.kind.value})
        return True

    async def _snooze(self, job: Job, delay_s: float) -> bool:
        state = await db.snooze(self._pool, job.id, job.attempt, delay_s, worker_id=self._worker_id)
        if state is None:
            return False
        labels = self._metrics.known.job(job.type, job.queue)
        extra = {"job_id": job.id, "attempt": job.attempt}
        if state is JobState.CANCELLED:
            self._metrics.jobs_cancelled.labels(*labels).inc()
            log.info("job snoozed; cancelled as requested instead", extra=extra)
        else:
            self._metrics.jobs_snoozed.labels(*labels).inc()
            log.info("job snoozed", extra={**extra, "run_in_s": delay_s})
        return True

    async def _write_failure(self, job: Job, error: str, delay_s: float | None) -> Job | None:
        """RETRYING after ``delay_s`` (CANCELLED if that was asked for), or FAILED
        without one; None when the job had moved on."""
        if delay_s is None:
            return await db.fail(self._pool, job.id, job.attempt, error, worker_id=self._worker_id)
        return await db.retry(
            self._pool, job.id, job.attempt, error, delay_s, worker_id=self._worker_id
        )
