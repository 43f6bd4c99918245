"""Keeps the queue-depth gauges current: how many jobs wait, and for how long.

Only known queues (``metrics.KnownLabels``) have gauges of their own; the jobs of
every other queue are summed into ``other`` (its oldest wait is the longest of
theirs), so that clients inventing queues cannot add series.
"""

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
        waiting: dict[str, int] = {}
        waited: dict[str, float] = {}
        for depth in await db.waiting_by_queue(self._pool):
            label = self._metrics.known.queue(depth.queue)
            waiting[label] = waiting.get(label, 0) + depth.waiting
            seconds = (now - depth.oldest_due).total_seconds() if depth.oldest_due else 0.0
            waited[label] = max(waited.get(label, 0.0), seconds)
        # A queue that emptied shows 0 rather than its last value.
        for label in self._queues - set(waiting):
            self._metrics.queue_depth.labels(label).set(0)
            self._metrics.oldest_waiting.labels(label).set(0)
        for label, n in waiting.items():
            self._metrics.queue_depth.labels(label).set(n)
            self._metrics.oldest_waiting.labels(label).set(waited[label])
        self._queues |= set(waiting)
