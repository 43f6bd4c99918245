"""Keeps the queue-depth gauges current: how many jobs wait, and for how long."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics


class DepthReporter:
    def __init__(self, pool: Any, metrics: SchedulerMetrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._queues: set[str] = set()

    async def run_once(self, now: datetime) -> None:
        depths = await db.waiting_by_queue(self._pool)
        seen = {depth.queue for depth in depths}
        # A queue that emptied shows 0 rather than its last value.
        for queue in self._queues - seen:
            self._metrics.queue_depth.labels(queue).set(0)
            self._metrics.oldest_waiting.labels(queue).set(0)
        for depth in depths:
            self._metrics.queue_depth.labels(depth.queue).set(depth.waiting)
            waited = (now - depth.oldest_due).total_seconds() if depth.oldest_due else 0.0
            self._metrics.oldest_waiting.labels(depth.queue).set(max(0.0, waited))
        self._queues |= seen
