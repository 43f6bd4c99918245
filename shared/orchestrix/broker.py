"""NATS JetStream as Orchestrix uses it: names, the message codec, stream and consumer.

A message says only "jobs X, Y, … are ready for these attempts": PostgreSQL
holds the jobs. A lost message is recovered from the database; a duplicate is
harmless because the worker's move to RUNNING is conditional on the state and
the attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats
import orjson
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError, ServiceUnavailableError

from orchestrix.backoff import until_connected
from orchestrix.settings import NatsSettings

log = logging.getLogger("broker")

# What a JetStream API call raises while NATS restarts or is unreachable: worth
# waiting out.
UNAVAILABLE = (
    nats_errors.TimeoutError,
    nats_errors.NoRespondersError,
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.StaleConnectionError,
    ServiceUnavailableError,
)

# How long JetStream remembers a message id to drop a republished duplicate.
DUPLICATE_WINDOW_S = 120.0
# Redelivery happens when a worker holds a message this long without a sign of
# life; workers send in_progress well within it while a job runs.
ACK_WAIT_S = 30.0


# The most job attempts one message may carry; a scheduler sends fewer (its
# SCHEDULER_JOBS_PER_MESSAGE), this bounds what a worker accepts.
MAX_JOBS_PER_MESSAGE = 10_000


@dataclass(frozen=True)
class Announcement:
    """The body of a job message: one or more (job id, attempt) pairs ready to run.

    One claim's jobs travel together, so a message, its publish ack, its delivery
    and its worker ack are paid once for many jobs.
    """

    attempts: tuple[tuple[str, int], ...]

    def encode(self) -> bytes:
        return orjson.dumps({"jobs": self.attempts})

    def msg_id(self, announced_at: datetime) -> str:
        """The JetStream message id: first job, its attempt, the size, and when this
        announcement was made.

        JetStream drops a second publish with the same id inside its window, so a
        publish the scheduler retries after an unclear failure is stored once. A
        republished job has a new ``announced_at``: its new message must not be
        dropped, since the old one may sit with a dead worker until its ack wait
        runs out. A duplicate that does get through is harmless (the start is
        conditional on the state and the attempt).
        """
        job_id, attempt = self.attempts[0]
        announced_us = int(announced_at.timestamp() * 1_000_000)
        return f"{job_id}:{attempt}:{announced_us}:{len(self.attempts)}"

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        """Raises ValueError for anything that is not an announcement."""
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        jobs = body.get("jobs") if isinstance(body, dict) else None
        if not isinstance(jobs, list) or not 1 <= len(jobs) <= MAX_JOBS_PER_MESSAGE:
            raise ValueError(f"needs a list of 1 to {MAX_JOBS_PER_MESSAGE} jobs")
        attempts = []
        for pair in jobs:
            match pair:
                case [str(job_id), int(attempt)] if attempt >= 1:
                    attempts.append((job_id, attempt))
                case _:
                    raise ValueError("each job must be [id, attempt], the attempt 1 or more")
        return cls(tuple(attempts))


def subject(settings: NatsSettings, queue: str) -> str:
    return f"{settings.subject_prefix}.{queue}"


async def connect(settings: NatsSettings, name: str, **callbacks: Any) -> Client:
    """Connect to any of the servers, and keep reconnecting forever, to any of them.

    A NATS restart, or the loss of one node of a cluster, must not end the
    process. nats-py tries the servers in random order, so processes spread over
    a cluster's nodes, and it adds the nodes a server tells it about.
    """
    client: Client = await nats.connect(
        list(settings.servers),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=2,
        **callbacks,
    )
    return client


def stream_config(settings: NatsSettings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[f"{settings.subject_prefix}.>"],
        # A message is removed once a worker acknowledges it.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def consumer_config(settings: NatsSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.consumer,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=-1,
        filter_subject=f"{settings.subject_prefix}.>",
        max_ack_pending=-1,
    )


async def ensure_stream(js: JetStreamContext, settings: NatsSettings) -> None:
    """Create the stream, or bring an existing one to our configuration."""
    config = stream_config(settings)
    try:
        await js.stream_info(settings.stream)
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream created", extra={"stream": settings.stream})
        return
    await js.update_stream(config)


async def ensure_consumer(js: JetStreamContext, settings: NatsSettings) -> None:
    """Create the workers' durable consumer, or update it; every worker shares it."""
    await ensure_stream(js, settings)
    await js.add_consumer(settings.stream, consumer_config(settings))


async def connect_with_backoff(
    settings: NatsSettings, name: str, stop: asyncio.Event, **callbacks: Any
) -> Client | None:
    """Connect once NATS answers; None if stopped first."""
    return await until_connected(
        lambda: connect(settings, name, **callbacks),
        what="nats",
        stop=stop,
        retry_on=(OSError, TimeoutError, NoServersError),
    )


async def ensure_with_backoff(
    ensure: Callable[[], Awaitable[None]], what: str, stop: asyncio.Event
) -> bool:
    """Run ``ensure`` (ensure_stream or ensure_consumer) until NATS answers it.

    A service that starts while NATS restarts waits instead of exiting. False
    when stopped first.
    """

    async def ensured() -> bool:
        await ensure()
        return True

    done = await until_connected(ensured, what=what, stop=stop, retry_on=UNAVAILABLE)
    return done is True


def cancel_subject(settings: NatsSettings) -> str:
    """Core NATS (not JetStream) subject on which the API asks workers to stop a job.

    Outside the stream's ``<prefix>.>`` subjects: requests are not stored, the
    lease renewal picks up any a worker missed.
    """
    return f"{settings.subject_prefix}_cancel"
