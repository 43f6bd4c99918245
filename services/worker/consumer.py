"""NATS messages in, acknowledgements out: the worker's main loop.

The worker fetches only as many messages as it has free slots, so a busy worker
leaves the rest of the queue to the others. A message is acknowledged only after
the state its job ended in is committed; while a job runs, ``in_progress`` keeps
JetStream from giving the message to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from orchestrix import broker
from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import jobs as db
from orchestrix.db.pool import RETRYABLE
from orchestrix.executors import JobContext, Registry
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.settings import Settings

from services.worker import runner
from services.worker.completer import Completer

log = logging.getLogger("worker")
FETCH_WAIT_S = 1.0
HEARTBEAT_S = broker.ACK_WAIT_S / 3
WRITE_RETRY_S = 0.5


class Consumer:
    def __init__(
        self,
        pool: Any,
        js: JetStreamContext,
        settings: Settings,
        registry: Registry,
        metrics: WorkerMetrics,
    ) -> None:
        self._pool = pool
        self._js = js
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self._completer = Completer(pool, settings.worker, metrics)
        self._concurrency = settings.worker.concurrency
        self._threads = ThreadPoolExecutor(self._concurrency, thread_name_prefix="executor")
        self._tasks: set[asyncio.Task[None]] = set()
        # Set once the grace period is over: unfinished jobs are handed back.
        self._abandon = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop``; then drain within the shutdown timeout."""
        sub = await self._js.pull_subscribe_bind(
            durable=self._settings.nats.consumer, stream=self._settings.nats.stream
        )
        try:
            while not stop.is_set():
                free = self._concurrency - len(self._tasks)
                if free == 0:
                    # Every slot busy: wait for one to free up, or for the stop.
                    stopping = asyncio.ensure_future(stop.wait())
                    await asyncio.wait(
                        {*self._tasks, stopping}, return_when=asyncio.FIRST_COMPLETED
                    )
                    stopping.cancel()
                    continue
                try:
                    messages = await sub.fetch(batch=free, timeout=FETCH_WAIT_S)
                except (TimeoutError, NatsTimeoutError):
                    continue
                except Exception as exc:  # NATS away: wait and fetch again
                    log.warning("fetch failed", extra={"error": repr(exc)})
                    await sleep_unless_stopped(stop, 1.0)
                    continue
                for message in messages:
                    if stop.is_set():
                        # Not started: give it straight back to another worker.
                        await _quietly(message.nak())
                        continue
                    task = asyncio.create_task(self._handle(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await self._drain()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        timeout = self._settings.worker.shutdown_timeout_s
        log.info("draining", extra={"running": len(self._tasks), "timeout_s": timeout})
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        if pending:
            log.warning("grace period over; handing back", extra={"jobs": len(pending)})
            self._abandon.set()
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    async def _handle(self, message: Msg) -> None:
        try:
            announced = broker.Announcement.decode(message.data)
        except ValueError as exc:
            log.error("undecodable message dropped", extra={"error": str(exc)})
            await _quietly(message.term())
            return
        try:
            job = await db.start(self._pool, announced.job_id, announced.attempt)
        except RETRYABLE as exc:
            log.warning("cannot start job", extra={"job_id": announced.job_id, "error": repr(exc)})
            await _quietly(message.nak(delay=1.0))
            return
        if job is None:
            # Cancelled, already run, or a duplicate message: nothing to do.
            log.debug("message skipped", extra={"job_id": announced.job_id})
            await _quietly(message.ack())
            return
        heartbeat = asyncio.create_task(_keep_alive(message))
        try:
            await self._execute(job, message)
        finally:
            heartbeat.cancel()

    async def _execute(self, job: Job, message: Msg) -> None:
        labels = (job.type, job.queue)
        started = job.started_at or job.run_at
        self._metrics.start_latency.labels(*labels).observe(
            max(0.0, (started - job.run_at).total_seconds())
        )
        log.info("job started", extra={"job_id": job.id, "type": job.type, "attempt": job.attempt})
        self._metrics.slots_busy.inc()
        clock = time.perf_counter()
        try:
            outcome = await runner.run(
                self._registry.get(job.type), JobContext.of(job), self._threads
            )
        except asyncio.CancelledError:
            await self._hand_back(job, message)
            raise
        finally:
            self._metrics.slots_busy.dec()
        name = "success" if isinstance(outcome, runner.Success) else outcome.kind.value
        self._metrics.job_duration.labels(*labels, name).observe(time.perf_counter() - clock)
        # The outcome must be committed before the message is acknowledged:
        # keep trying while the database is away, unless told to let go.
        while True:
            try:
                await self._completer.record(job, outcome)
                break
            except RETRYABLE as exc:
                log.warning(
                    "cannot record outcome; retrying", extra={"job_id": job.id, "error": repr(exc)}
                )
                if self._abandon.is_set():
                    return  # unacknowledged: redelivered, and the job stays RUNNING
                await asyncio.sleep(WRITE_RETRY_S)
        await _quietly(message.ack())

    async def _hand_back(self, job: Job, message: Msg) -> None:
        try:
            handed = await db.hand_back(self._pool, job.id, job.attempt)
        except RETRYABLE as exc:
            log.error("cannot hand back job", extra={"job_id": job.id, "error": repr(exc)})
            return
        if handed:
            self._metrics.jobs_handed_back.labels(job.type, job.queue).inc()
            log.warning(
                "job handed back unfinished", extra={"job_id": job.id, "attempt": job.attempt}
            )
        await _quietly(message.nak())


async def _keep_alive(message: Msg) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        await _quietly(message.in_progress())


async def _quietly(call: Any) -> None:
    """Acks and naks are best effort: a lost one means a redelivery, which is harmless."""
    try:
        await call
    except Exception as exc:
        log.debug("ack not delivered", extra={"error": repr(exc)})
