"""NATS messages in, acknowledgements out: the worker's main loop.

The worker fetches only as many messages as it has free slots, so a busy worker
leaves the rest of the queue to the others. A message is acknowledged only after
the state its job ended in is committed; while a job runs, ``in_progress`` keeps
JetStream from giving the message to another worker, and one UPDATE per beat
renews the leases of every job this worker runs, so the rescuer leaves them be.

A running job stops early for one of three reasons: the worker is shutting down
(the job is handed back), a user cancelled it (it ends CANCELLED), or its lease
was lost to the rescuer (the job is no longer ours; nothing is written).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from orchestrix import broker, ids
from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.executors import JobContext, Registry
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.settings import Settings

from services.worker import runner
from services.worker.batching import Batcher
from services.worker.completer import Completer

log = logging.getLogger("worker")
FETCH_WAIT_S = 1.0
WRITE_RETRY_S = 0.5


class Stop(Enum):
    """Why a running job's task was cancelled."""

    SHUTDOWN = "shutdown"
    CANCEL = "cancel"
    LOST = "lost"


@dataclass
class Running:
    job: Job
    task: asyncio.Task[None]
    message: Msg
    stop: Stop | None = None


class Consumer:
    def __init__(
        self,
        pool: Any,
        nc: Client,
        settings: Settings,
        registry: Registry,
        metrics: WorkerMetrics,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self._completer = Completer(pool, settings.worker, metrics)
        self._concurrency = settings.worker.concurrency
        self._lease_s = settings.recovery.lease_timeout_s
        self._threads = ThreadPoolExecutor(self._concurrency, thread_name_prefix="executor")
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, Running] = {}
        # Jobs whose messages arrive together move to RUNNING in one UPDATE.
        self._starts: Batcher[tuple[str, int], Job | None] = Batcher(
            lambda attempts: db.start_many(self._pool, attempts, self._lease_s), max_size=500
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop``; then drain within the shutdown timeout."""
        sub = await self._js.pull_subscribe_bind(
            durable=self._settings.nats.consumer, stream=self._settings.nats.stream
        )
        cancels = await self._nc.subscribe(
            broker.cancel_subject(self._settings.nats), cb=self._on_cancel_request
        )
        beat = asyncio.create_task(self._renew_leases())
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
            beat.cancel()
            for subscription in (cancels, sub):
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        timeout = self._settings.worker.shutdown_timeout_s
        log.info("draining", extra={"running": len(self._tasks), "timeout_s": timeout})
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        if pending:
            log.warning("grace period over; handing back", extra={"jobs": len(pending)})
            for running in list(self._running.values()):
                self._stop(running, Stop.SHUTDOWN)
            await asyncio.wait(pending)

    def _stop(self, running: Running, reason: Stop) -> None:
        if running.stop is None:
            running.stop = reason
            running.task.cancel()

    async def _on_cancel_request(self, message: Msg) -> None:
        running = self._running.get(message.data.decode(errors="replace"))
        if running is not None:
            log.info("cancellation requested", extra={"job_id": running.job.id})
            self._stop(running, Stop.CANCEL)

    async def _renew_leases(self) -> None:
        """The worker's heartbeat, for all its running jobs at once.

        Every third of the lease (or of the ack wait, if shorter): tell JetStream
        each job's message is still in progress, and renew all the leases in one
        statement, on a connection of its own so that job writes queueing for the
        pool (after a database outage, say) never hold up the renewal.
        """
        conn: asyncpg.Connection | None = None
        beat_s = min(self._lease_s, broker.ACK_WAIT_S) / 3
        try:
            while True:
                await asyncio.sleep(beat_s)
                live = [r for r in self._running.values() if r.stop is None]
                for running in live:
                    await _quietly(running.message.in_progress())
                mine = {r.job.id: r.job.attempt for r in live}
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self._settings.database.url, timeout=5)
                    renewal = await db.renew_leases(conn, mine, self._lease_s)
                except Exception as exc:  # a dead beat would let the rescuer take live jobs
                    log.warning(
                        "cannot renew leases", extra={"error": repr(exc), "jobs": len(mine)}
                    )
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    continue
                self._apply(renewal)
        finally:
            if conn is not None:
                conn.terminate()

    def _apply(self, renewal: db.Renewal) -> None:
        """Stop the jobs a user cancelled, and the ones the rescuer has taken."""
        stops = [(i, Stop.CANCEL) for i in renewal.cancel] + [(i, Stop.LOST) for i in renewal.lost]
        for job_id, reason in stops:
            running = self._running.get(job_id)
            if running is not None:
                self._stop(running, reason)

    async def _handle(self, message: Msg) -> None:
        try:
            announced = broker.Announcement.decode(message.data)
        except ValueError as exc:
            log.error("undecodable message dropped", extra={"error": str(exc)})
            await _quietly(message.term())
            return
        if not ids.is_valid(announced.job_id):
            log.error("message for a malformed job id dropped", extra={"job_id": announced.job_id})
            await _quietly(message.term())
            return
        try:
            job = await self._starts.submit((announced.job_id, announced.attempt))
        except TRANSIENT as exc:
            log.warning("cannot start job", extra={"job_id": announced.job_id, "error": repr(exc)})
            await _quietly(message.nak(delay=1.0))
            return
        if job is None:
            # Cancelled, already run, or a duplicate message: nothing to do.
            log.debug("message skipped", extra={"job_id": announced.job_id})
            await _quietly(message.ack())
            return
        task = asyncio.current_task()
        assert task is not None
        running = Running(job, task, message)
        self._running[job.id] = running
        try:
            await self._execute(running, message)
        except asyncio.CancelledError:
            await self._stopped(running, message)
        except Exception:
            # Unacknowledged and unrenewed: the rescuer takes the job after its lease.
            log.exception("job handling failed", extra={"job_id": job.id})
        finally:
            self._running.pop(job.id, None)

    async def _execute(self, running: Running, message: Msg) -> None:
        job = running.job
        labels = (job.type, job.queue)
        started = job.started_at or job.run_at
        self._metrics.start_latency.labels(*labels).observe(
            max(0.0, (started - job.run_at).total_seconds())
        )
        log.debug("job started", extra={"job_id": job.id, "type": job.type, "attempt": job.attempt})
        self._metrics.slots_busy.inc()
        clock = time.perf_counter()
        try:
            outcome = await runner.run(
                self._registry.get(job.type), JobContext.of(job), self._threads
            )
        finally:
            self._metrics.slots_busy.dec()
        name = "success" if isinstance(outcome, runner.Success) else outcome.kind.value
        self._metrics.job_duration.labels(*labels, name).observe(time.perf_counter() - clock)
        # The outcome must be committed before the message is acknowledged:
        # keep trying while the database is away. If the lease runs out
        # meanwhile, the rescuer takes the job and the write finds it moved.
        while True:
            try:
                await self._completer.record(job, outcome)
                break
            except TRANSIENT as exc:
                log.warning(
                    "cannot record outcome; retrying",
                    extra={"job_id": job.id, "error": repr(exc)},
                )
                await asyncio.sleep(WRITE_RETRY_S)
        # Written: from here on the job is not ours to stop or to lose.
        self._running.pop(job.id, None)
        await _quietly(message.ack())

    async def _stopped(self, running: Running, message: Msg) -> None:
        """The attempt was cancelled from outside: finish it the way its reason asks."""
        job = running.job
        extra = {"job_id": job.id, "attempt": job.attempt}
        try:
            if running.stop is Stop.CANCEL:
                if await db.cancel_running(self._pool, job.id, job.attempt) is not None:
                    self._metrics.jobs_cancelled.labels(job.type, job.queue).inc()
                    log.info("job cancelled while running", extra=extra)
                await _quietly(message.ack())
            elif running.stop is Stop.LOST:
                log.warning("lease lost; attempt abandoned", extra=extra)
                await _quietly(message.ack())
            else:
                if await db.hand_back(self._pool, job.id, job.attempt):
                    self._metrics.jobs_handed_back.labels(job.type, job.queue).inc()
                    log.warning("job handed back unfinished", extra=extra)
                await _quietly(message.nak())
        except TRANSIENT as exc:
            # Unacknowledged: the lease runs out and the rescuer takes the job.
            log.error("cannot record the stop", extra={**extra, "error": repr(exc)})


async def _quietly(call: Any) -> None:
    """Acks and naks are best effort: a lost one means a redelivery, which is harmless."""
    try:
        await call
    except Exception as exc:
        log.debug("ack not delivered", extra={"error": repr(exc)})
