"""Claim due jobs in batches and publish one message per job attempt.

The claim commits before anything is published, so a worker can never receive a
message for a job whose SCHEDULED state it cannot yet see. A publish that fails
is kept and retried before the next claim; the message id (job id and attempt)
lets JetStream drop a retry that did reach it the first time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js import JetStreamContext
from orchestrix import broker
from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import NatsSettings

log = logging.getLogger("scheduler")
PUBLISH_TIMEOUT_S = 5.0


class Claimer:
    def __init__(
        self,
        pool: Any,
        js: JetStreamContext,
        nats: NatsSettings,
        metrics: SchedulerMetrics,
        batch_size: int,
    ) -> None:
        self._pool = pool
        self._js = js
        self._nats = nats
        self._metrics = metrics
        self._batch_size = batch_size
        self.unpublished: list[db.Claimed] = []

    async def run_once(self) -> int:
        """Publish what is left over, then claim and publish one batch; return the batch size."""
        if self.unpublished:
            self.unpublished = await self._publish(self.unpublished)
            if self.unpublished:
                return 0
        with self._metrics.claim_duration.time():
            claimed = await db.claim_due(self._pool, self._batch_size)
        if claimed:
            self.unpublished = await self._publish(claimed)
        return len(claimed)

    async def _publish(self, claimed: list[db.Claimed]) -> list[db.Claimed]:
        """Publish concurrently, awaiting the acks together; return what failed."""
        results = await asyncio.gather(
            *(self._publish_one(job) for job in claimed), return_exceptions=True
        )
        failed = []
        for job, result in zip(claimed, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(job)
                log.warning(
                    "publish failed; will retry",
                    extra={"job_id": job.id, "attempt": job.attempt, "error": repr(result)},
                )
            else:
                self._metrics.jobs_scheduled.labels(job.queue).inc()
                log.debug("job scheduled", extra={"job_id": job.id, "attempt": job.attempt})
        return failed

    async def _publish_one(self, job: db.Claimed) -> None:
        message = broker.Announcement(job.id, job.attempt)
        await self._js.publish(
            broker.subject(self._nats, job.queue),
            message.encode(),
            timeout=PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": message.msg_id},
        )
