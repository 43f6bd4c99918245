"""Claim due jobs in batches and announce them, many jobs to a message.

The claim commits before anything is published, so a worker can never receive a
message for a job whose SCHEDULED state it cannot yet see. A publish that fails
is kept and retried before the next claim; should this scheduler die first, the
republisher announces those jobs once they have waited long enough.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics

from services.scheduler.publisher import Message, Publisher

log = logging.getLogger("scheduler")


class Claimer:
    def __init__(
        self, pool: Any, publisher: Publisher, metrics: SchedulerMetrics, batch_size: int
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._metrics = metrics
        self._batch_size = batch_size
        self.unpublished: list[Message] = []

    async def run_once(self) -> int:
        """Publish what is left over, then claim and publish one batch; return the batch size."""
        if self.unpublished:
            self.unpublished = self._count(*await self._publisher.publish(self.unpublished))
            if self.unpublished:
                return 0
        with self._metrics.claim_duration.time():
            claimed = await db.claim_due(self._pool, self._batch_size)
        if claimed:
            self.unpublished = self._count(*await self._publisher.announce(claimed))
        return len(claimed)

    def _count(self, published: list[Message], failed: list[Message]) -> list[Message]:
        """Count what went out; return what did not, to publish again (same message ids)."""
        for message in published:
            self._metrics.jobs_scheduled.labels(message.queue).inc(len(message.jobs))
        return failed
