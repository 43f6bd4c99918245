"""The three ways a running attempt is stopped from outside, and what each writes.

- SHUTDOWN: the worker is stopping and the attempt did not finish in time. It is
  handed back to PENDING, not counted, so another worker runs it at once; after
  MAX_HANDOFFS hand-backs in a row, a further one counts as a failed attempt,
  so a job that never fits in SHUTDOWN_TIMEOUT is not handed back forever.
  When PostgreSQL does not take the hand-back before the worker must exit, the
  worker leaves it in the hand-back ledger on NATS (``orchestrix.handbacks``),
  which the scheduler applies once the database answers.
- CANCEL: a user asked for it to stop. It ends CANCELLED.
- LOST: the attempt is no longer this worker's (the rescuer took it). Nothing
  is written: whoever owns the job now decides.
- FENCED: the worker could not renew its lease and stopped the attempt before
  the lease ran out. PostgreSQL does not answer, so the attempt is returned
  through the hand-back ledger; if the rescuer takes it first, it counts.

A stop arrives only while the executor runs. Once an outcome is being written
nothing stops it: the write is guarded by the attempt, so a late one changes
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, TypeVar

from nats.js import JetStreamContext
from orchestrix import handbacks
from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.errors import Kind
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.services.worker.completer import Completer
from orchestrix.services.worker.runner import Failure
from orchestrix.settings import NatsSettings
from orchestrix.states import JobState

log = logging.getLogger("worker")

MAX_HANDOFFS = 3
# A stop's write is retried this long while the database is away.
WRITE_PATIENCE_S = 10.0
WRITE_RETRY_S = 0.5
# How long JetStream gets to store a ledger entry.
LEDGER_TIMEOUT_S = 2.0

T = TypeVar("T")


class Stop(Enum):
    """Why a running job's task was cancelled."""

    SHUTDOWN = "shutdown"
    CANCEL = "cancel"
    LOST = "lost"
    FENCED = "fenced"


async def persist(
    write: Callable[[], Awaitable[T]],
    what: str,
    extra: dict[str, Any],
    *,
    patience_s: float | None = WRITE_PATIENCE_S,
) -> T:
    """Run ``write`` until it gets through, for at most ``patience_s`` of outage
    (None: as long as it takes)."""
    deadline = None if patience_s is None else time.monotonic() + patience_s
    while True:
        try:
            return await write()
        except TRANSIENT as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            log.warning(f"cannot {what}; retrying", extra={**extra, "error": repr(exc)})
            await asyncio.sleep(WRITE_RETRY_S)


class Stopper:
    def __init__(
        self,
        pool: Any,
        completer: Completer,
        metrics: WorkerMetrics,
        *,
        worker_id: str,
        ledger: tuple[JetStreamContext, NatsSettings] | None = None,
    ) -> None:
        """``ledger``: where to return attempts the database would not take back."""
        self._pool = pool
        self._worker_id = worker_id
        self._ledger = ledger
        self._completer = completer
        self._metrics = metrics

    async def finish(self, job: Job, reason: Stop) -> None:
        """Write what ``reason`` asks for the stopped attempt of ``job``."""
        extra = {"job_id": job.id, "attempt": job.attempt}
        labels = self._metrics.known.job(job.type, job.queue)
        try:
            if reason is Stop.LOST:
                log.warning("lease lost; attempt abandoned", extra=extra)
            elif reason is Stop.FENCED:
                # Stopped because PostgreSQL did not answer: the attempt is returned
                # through the ledger (a hand-back), not left to be counted as lost.
                if job.handoffs < MAX_HANDOFFS:
                    await self.leave_word(job)
            elif reason is Stop.CANCEL:
                cancelled = await persist(
                    lambda: db.cancel_running(
                        self._pool, job.id, job.attempt, worker_id=self._worker_id
                    ),
                    "cancel",
                    extra,
                )
                if cancelled is not None:
                    self._metrics.jobs_cancelled.labels(*labels).inc()
                    log.info("job cancelled while running", extra=extra)
            elif job.handoffs >= MAX_HANDOFFS:
                error = (
                    f"Interrupted: the attempt was stopped by a worker shutdown after "
                    f"{job.handoffs} hand-backs in a row; this one counts as a failed attempt"
                )
                await persist(
                    lambda: self._completer.record(job, Failure(error, Kind.RETRYABLE)),
                    "record the interrupted attempt",
                    extra,
                )
            else:
                state = await persist(
                    lambda: db.hand_back(
                        self._pool, job.id, job.attempt, worker_id=self._worker_id
                    ),
                    "hand back",
                    extra,
                )
                if state is JobState.PENDING:
                    self._metrics.jobs_handed_back.labels(*labels).inc()
                    log.warning("job handed back unfinished", extra=extra)
                elif state is JobState.CANCELLED:
                    self._metrics.jobs_cancelled.labels(*labels).inc()
                    log.info("job cancelled at hand-back", extra=extra)
        except TRANSIENT as exc:
            log.error("cannot record the stop", extra={**extra, "error": repr(exc)})
            if reason is Stop.SHUTDOWN and job.handoffs < MAX_HANDOFFS:
                await self.leave_word(job)
            # Otherwise still RUNNING: the lifeline or the rescuer takes the job.

    async def leave_word(self, job: Job) -> bool:
        """Return the attempt through the hand-back ledger on NATS; False if even that
        failed (then the attempt counts as lost when it is taken back)."""
        extra = {"job_id": job.id, "attempt": job.attempt}
        if self._ledger is None:
            return False
        js, nats = self._ledger
        entry = handbacks.HandBack(job.id, job.attempt, self._worker_id).encode()
        for first in (True, False):
            try:
                await js.publish(handbacks.subject(nats), entry, timeout=LEDGER_TIMEOUT_S)
                break
            except Exception as exc:
                if first:  # no stream yet (no scheduler has run): make it, once
                    with contextlib.suppress(Exception):
                        await handbacks.ensure_stream(js, nats)
                    continue
                log.error(
                    "hand-back not left on NATS either; the attempt will count as lost",
                    extra={**extra, "error": repr(exc)},
                )
                return False
        self._metrics.jobs_handed_back.labels(*self._metrics.known.job(job.type, job.queue)).inc()
        log.warning("hand-back left in the ledger; applied once PostgreSQL answers", extra=extra)
        return True
