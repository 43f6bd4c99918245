"""Announces claimed job attempts on NATS JetStream, concurrently, awaiting the acks together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

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
        """Publish every job; return (published, failed).

        The messages go out back to back and their acks are awaited together, so a
        batch costs about one round trip, not one per job.
        """
        sent: list[asyncio.Future[Any] | BaseException] = []
        for job in jobs:
            try:
                sent.append(await self._send(job))
            except Exception as exc:  # not connected, too many pending: this one failed
                sent.append(exc)
        results = await asyncio.gather(*(_acked(item) for item in sent), return_exceptions=True)
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

    async def _send(self, job: Claimed) -> asyncio.Future[Any]:
        message = broker.Announcement(job.id, job.attempt)
        # The message id lets JetStream drop a second publish of the same announcement.
        return await self._js.publish_async(
            broker.subject(self._nats, job.queue),
            message.encode(),
            wait_stall=PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": message.msg_id(job.announced_at)},
        )


async def _acked(sent: asyncio.Future[Any] | BaseException) -> None:
    """Wait for one publish's ack; an ack that never comes (NATS went away) times out."""
    if isinstance(sent, BaseException):
        raise sent
    await asyncio.wait_for(sent, PUBLISH_TIMEOUT_S)
