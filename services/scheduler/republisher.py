"""Announces again the scheduled jobs that never started: their message was lost.

A message can be lost when a scheduler dies between its claim and its publish,
or when NATS loses what it had not yet written to disk. While the workers'
consumer still has undelivered messages, a job waiting its turn is expected and
only jobs waiting far longer are announced again; duplicates stay harmless, as
a worker starts a job only from SCHEDULED at the announced attempt.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import NatsSettings, RecoverySettings

from services.scheduler.publisher import Publisher

log = logging.getLogger("scheduler")
BATCH = 1000
# With a backlog in NATS, wait this many times longer before suspecting a loss.
BACKLOG_PATIENCE = 10


class Republisher:
    def __init__(
        self,
        pool: Any,
        js: JetStreamContext,
        publisher: Publisher,
        nats: NatsSettings,
        recovery: RecoverySettings,
        metrics: SchedulerMetrics,
    ) -> None:
        self._pool = pool
        self._js = js
        self._publisher = publisher
        self._nats = nats
        self._recovery = recovery
        self._metrics = metrics

    async def run_once(self) -> int:
        try:
            info = await self._js.consumer_info(self._nats.stream, self._nats.consumer)
        except NotFoundError:
            return 0  # no worker has joined yet: nothing would take the messages
        wait_s = self._recovery.republish_after_s
        if info.num_pending:
            wait_s *= BACKLOG_PATIENCE
        stale = await db.due_for_republish(self._pool, older_than_s=wait_s, limit=BATCH)
        if not stale:
            return 0
        published, _ = await self._publisher.announce(stale)
        for message in published:
            self._metrics.jobs_republished.labels(message.queue).inc(len(message.jobs))
            for job in message.jobs:
                log.warning("job announced again", extra={"job_id": job.id, "attempt": job.attempt})
        return sum(len(message.jobs) for message in published)
