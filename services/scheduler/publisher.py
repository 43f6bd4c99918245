"""Announces claimed job attempts on NATS JetStream, many jobs to a message.

A claim's jobs are grouped by queue into messages of at most
SCHEDULER_JOBS_PER_MESSAGE jobs, split evenly so the workers share them. The
messages go out back to back and their acks are awaited together, so a claim
costs about one round trip, not one per job or per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from orchestrix import broker
from orchestrix.db.jobs import Claimed
from orchestrix.settings import NatsSettings

log = logging.getLogger("scheduler")
PUBLISH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Message:
    """One message to publish: jobs of one queue, claimed (or republished) together."""

    queue: str
    jobs: tuple[Claimed, ...]

    @property
    def announcement(self) -> broker.Announcement:
        return broker.Announcement(tuple((job.id, job.attempt) for job in self.jobs))


def messages(jobs: Sequence[Claimed], per_message: int) -> list[Message]:
    """Group ``jobs`` by queue, in their order, into messages of at most ``per_message``.

    A queue's n jobs go into ceil(n / per_message) messages of nearly equal size:
    260 jobs at 50 a message are six messages of 43 or 44, not five of 50 and one
    of 10.
    """
    by_queue: dict[str, list[Claimed]] = {}
    for job in jobs:
        by_queue.setdefault(job.queue, []).append(job)
    out: list[Message] = []
    for queue, queued in by_queue.items():
        count = -(-len(queued) // per_message)
        size, extra = divmod(len(queued), count)
        start = 0
        for index in range(count):
            end = start + size + (1 if index < extra else 0)
            out.append(Message(queue, tuple(queued[start:end])))
            start = end
    return out


class Publisher:
    def __init__(self, js: JetStreamContext, nats: NatsSettings, jobs_per_message: int) -> None:
        self._js = js
        self._nats = nats
        self._per_message = jobs_per_message

    async def announce(self, jobs: Sequence[Claimed]) -> tuple[list[Message], list[Message]]:
        """Publish ``jobs`` as messages; return (published, failed) messages."""
        return await self.publish(messages(jobs, self._per_message))

    async def publish(self, batch: Sequence[Message]) -> tuple[list[Message], list[Message]]:
        """Publish every message; return (published, failed)."""
        sent: list[asyncio.Future[Any] | BaseException] = []
        for message in batch:
            try:
                sent.append(await self._send(message))
            except Exception as exc:  # not connected, too many pending: this one failed
                sent.append(exc)
        results = await asyncio.gather(*(_acked(item) for item in sent), return_exceptions=True)
        published, failed = [], []
        for message, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(message)
                log.warning(
                    "publish failed",
                    extra={
                        "queue": message.queue,
                        "jobs": len(message.jobs),
                        "error": repr(result),
                    },
                )
            else:
                published.append(message)
        return published, failed

    async def _send(self, message: Message) -> asyncio.Future[Any]:
        announcement = message.announcement
        # The message id lets JetStream drop a second publish of the same announcement.
        msg_id = announcement.msg_id(message.jobs[0].announced_at)
        return await self._js.publish_async(
            broker.subject(self._nats, message.queue),
            announcement.encode(),
            wait_stall=PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": msg_id},
        )


async def _acked(sent: asyncio.Future[Any] | BaseException) -> None:
    """Wait for one publish's ack; an ack that never comes (NATS went away) times out."""
    if isinstance(sent, BaseException):
        raise sent
    await asyncio.wait_for(sent, PUBLISH_TIMEOUT_S)
