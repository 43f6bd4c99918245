"""Notices dead workers within seconds and takes their jobs back.

A worker's process holds two connections that end with it: its heartbeat's
PostgreSQL session (named in ``workers``) and its NATS connection (it answers on
its own subject). When both are gone, the process is gone, or cut off from
both, and then it has stopped its jobs itself: ``orchestrix.liveness`` gives
the timing that makes this safe. A worker that is alive but cut off from one of
them answers on the other and keeps its jobs until their leases say otherwise
(services/scheduler/rescuer.py).

"Gone from NATS" is NATS's own answer, "no responders": a request that merely
times out proves nothing (our own connection may be the one in trouble).

A dead worker's job is due again at once, its attempt counted as failed; a
job that kills every worker it runs on ends FAILED after its attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.aio.client import Client
from nats.errors import NoRespondersError
from orchestrix import broker
from orchestrix.db import jobs as db
from orchestrix.db import workers
from orchestrix.lifecycle import actor
from orchestrix.liveness import CONFIRM_S, LOOK_EVERY_S
from orchestrix.metrics import SchedulerMetrics
from orchestrix.services.scheduler.rescuer import BATCH, decide
from orchestrix.settings import NatsSettings, RetrySettings

log = logging.getLogger("scheduler")
PROBE_TIMEOUT_S = 0.5
WORKER_DIED = "WorkerLost: the worker running this attempt died"


class Lifeline:
    def __init__(
        self,
        pool: Any,
        nc: Client,
        nats: NatsSettings,
        retry_settings: RetrySettings,
        metrics: SchedulerMetrics,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._nats = nats
        self._retry = retry_settings
        self._metrics = metrics
        self._actor = actor("lifeline")  # who took the attempts back, in their history
        # Worker id -> when it was first seen gone from both, and last seen so.
        self._gone: dict[str, tuple[float, float]] = {}

    async def run_once(self, now: float | None = None) -> int:
        """Look once; take back the jobs of workers confirmed dead. Returns how many."""
        now = time.monotonic() if now is None else now
        suspects = await workers.session_gone(self._pool)
        # Asked all at once: a look takes one probe's time, however many are gone.
        answers = await asyncio.gather(*(self._gone_from_nats(w) for w in suspects))
        gone: dict[str, tuple[float, float]] = {}
        for worker_id, gone_from_nats in zip(suspects, answers, strict=True):
            if not gone_from_nats:
                continue
            first, last = self._gone.get(worker_id, (now, now))
            # A gap between looks could hide a moment the worker was back.
            if now - last > 2 * LOOK_EVERY_S:
                first = now
            gone[worker_id] = (first, now)
        self._gone = gone
        dead = [w for w, (first, _) in gone.items() if now - first >= CONFIRM_S]
        if not dead:
            return 0
        return await self._take_back(dead)

    async def _gone_from_nats(self, worker_id: str) -> bool:
        try:
            await self._nc.request(
                broker.worker_subject(self._nats, worker_id), b"", timeout=PROBE_TIMEOUT_S
            )
        except NoRespondersError:
            return True
        except Exception as exc:  # a timeout, or our own connection in trouble
            log.debug("worker probe unanswered", extra={"worker_id": worker_id, "error": repr(exc)})
        return False

    async def _take_back(self, dead: list[str]) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            lost = await db.lost_by_worker(conn, dead, limit=BATCH)
            rescued = await db.take_back(
                conn, decide(lost, self._retry, delay=False), WORKER_DIED, actor=self._actor
            )
            if len(lost) < BATCH:
                await workers.forget(conn, dead)
        for worker_id in dead:
            self._metrics.workers_lost.inc()
            log.warning("worker dead; its jobs taken back", extra={"worker_id": worker_id})
            self._gone.pop(worker_id, None)
        for job in rescued:
            queue = self._metrics.known.queue(job.queue)
            self._metrics.jobs_rescued.labels(queue, job.state.value).inc()
            log.warning(
                "worker died; job rescued",
                extra={"job_id": job.id, "attempt": job.attempt, "state": job.state.value},
            )
        if rescued:
            await self._nc.publish(broker.wake_subject(self._nats), b"")
        return len(rescued)
