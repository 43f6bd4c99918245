"""Announces claimed job attempts on NATS JetStream, concurrently, awaiting the acks together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nats.js import JetStreamContext
from orchestrix import broker
from orchestrix.db.jobs import Claimed
from orchestrix.settings import NatsSettings

log = logging.getLogger("scheduler")
PUBLISH_TIMEOUT_S = 5.0


class Publisher:
    def __init__(self, js: JetStreamContext, nats: NatsSettings) -> None:
        self._js = js
        self._nats = nats

    async def publish(self, jobs: Sequence[Claimed]) -> tuple[list[Claimed], list[Claimed]]:
        """Publish every job; return (published, failed)."""
        results = await asyncio.gather(*(self._one(job) for job in jobs), return_exceptions=True)
        published, failed = [], []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(job)
                log.warning(
                    "publish failed",
                    extra={"job_id": job.id, "attempt": job.attempt, "error": repr(result)},
                )
            else:
                published.append(job)
        return published, failed

    async def _one(self, job: Claimed) -> None:
        message = broker.Announcement(job.id, job.attempt)
        # The message id lets JetStream drop a second publish of the same announcement.
        await self._js.publish(
            broker.subject(self._nats, job.queue),
            message.encode(),
            timeout=PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": message.msg_id(job.announced_at)},
        )
