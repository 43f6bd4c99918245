"""NATS messages in, acknowledgements out: the worker's main loop.

A message announces one or more job attempts. The worker keeps pull requests
outstanding for about as many jobs as it has free slots (WORKER_CONCURRENCY), so
a busy worker leaves the rest of the queue to the others and an idle one gets a
message the moment it is published. Announced jobs wait for a slot; the jobs
that get one move to RUNNING together, in one UPDATE.

A message is acknowledged once every job it announced is settled: its outcome
committed, or found already taken, cancelled or run. If a job must be run
again (handed back at shutdown, or not started because the database was away)
the message is instead given back (nak), and its redelivery starts only the
jobs still SCHEDULED. While its jobs wait or run, ``in_progress`` keeps
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
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg
from orchestrix import broker, ids
from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.executors import JobContext, Registry
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.settings import Settings

from services.worker import runner
from services.worker.completer import Completer
from services.worker.puller import Puller

log = logging.getLogger("worker")
WRITE_RETRY_S = 0.5
# A message whose jobs could not be started (the database was away) comes back after this.
START_RETRY_S = 1.0
# Most jobs moved to RUNNING by one UPDATE.
START_BATCH = 500
# The feed loop looks at its requests at least this often.
IDLE_WAKE_S = 1.0


class Stop(Enum):
    """Why a running job's task was cancelled."""

    SHUTDOWN = "shutdown"
    CANCEL = "cancel"
    LOST = "lost"


@dataclass(eq=False)
class Delivery:
    """A message and how many of the job attempts it announced are not yet settled."""

    message: Msg
    unsettled: int
    redeliver: bool = False
    delay_s: float | None = None


@dataclass
class Running:
    job: Job
    task: asyncio.Task[None]
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
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self._completer = Completer(pool, settings.retry, metrics)
        self._concurrency = settings.worker.concurrency
        self._lease_s = settings.recovery.lease_timeout_s
        self._threads = ThreadPoolExecutor(self._concurrency, thread_name_prefix="executor")
        self._tasks: set[asyncio.Task[None]] = set()  # one per running job: its slot
        self._running: dict[str, Running] = {}
        # Announced, not yet started: (message, job id, attempt), oldest first.
        self._waiting: deque[tuple[Delivery, str, int]] = deque()
        self._deliveries: set[Delivery] = set()  # messages not yet settled
        # Jobs per message lately: how many messages to ask for to fill the slots.
        self._sizes: deque[int] = deque(maxlen=16)
        self._wake = asyncio.Event()
        self._stopping = False
        self._puller = Puller(
            nc, settings.nats.stream, settings.nats.consumer, self._received, self._wake.set
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop``; then drain within the shutdown timeout."""
        await self._puller.start()
        cancels = await self._nc.subscribe(
            broker.cancel_subject(self._settings.nats), cb=self._on_cancel_request
        )
        beat = asyncio.create_task(self._renew_leases())
        stopped = asyncio.create_task(stop.wait())
        stopped.add_done_callback(lambda _: self._wake.set())
        try:
            while not stop.is_set():
                await self._ask_for_more()
                await self._start_waiting()
                if self._waiting and len(self._tasks) < self._concurrency:
                    continue  # more can start at once
                # Wake for a message, a finished job, a request JetStream ended, in
                # time to renew the open request before it expires, and at least
                # every IDLE_WAKE_S (after a reconnect, the requests are gone).
                renewal = self._puller.next_renewal_s()
                wait_s = IDLE_WAKE_S if renewal is None else min(renewal, IDLE_WAKE_S)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            self._stopping = True
            stopped.cancel()
            await self._puller.stop()
            # Announced but not started: give them back to another worker now.
            while self._waiting:
                await self._settle(self._waiting.popleft()[0], redeliver=True)
            await self._drain()
            beat.cancel()
            with contextlib.suppress(Exception):
                await cancels.unsubscribe()
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _received(self, message: Msg) -> None:
        """A message from the puller: queue its jobs for a slot."""
        try:
            announced = broker.Announcement.decode(message.data)
        except ValueError as exc:
            log.error("undecodable message dropped", extra={"error": str(exc)})
            await _quietly(message.term())
            return
        attempts = []
        for job_id, attempt in announced.attempts:
            if ids.is_valid(job_id):
                attempts.append((job_id, attempt))
            else:
                log.error("announcement of a malformed job id dropped", extra={"job_id": job_id})
        if not attempts:
            await _quietly(message.term())
            return
        if self._stopping:
            await _quietly(message.nak())
            return
        delivery = Delivery(message, len(attempts))
        self._deliveries.add(delivery)
        self._waiting.extend((delivery, job_id, attempt) for job_id, attempt in attempts)
        self._sizes.append(len(attempts))
        self._wake.set()

    async def _ask_for_more(self) -> None:
        """Keep pull requests open for about as many jobs as there are slots not spoken for.

        A new request goes out when there is room for a message of the usual size
        (or a quarter of the slots), or when none is open at all, so that few
        requests wait at JetStream and one is always there.
        """
        sizes = self._sizes
        per_message = (
            sum(sizes) / len(sizes) if sizes else self._settings.scheduler.jobs_per_message
        )
        outstanding = self._puller.outstanding
        missing = (
            self._concurrency - len(self._tasks) - len(self._waiting) - outstanding * per_message
        )
        if missing <= 0:
            return
        if outstanding == 0 or missing >= max(per_message, self._concurrency / 4):
            await self._puller.request(max(1, math.ceil(missing / per_message)))

    async def _start_waiting(self) -> None:
        """Move as many waiting jobs to RUNNING as there are free slots, in one UPDATE."""
        count = min(self._concurrency - len(self._tasks), len(self._waiting), START_BATCH)
        if count <= 0:
            return
        batch = [self._waiting.popleft() for _ in range(count)]
        try:
            jobs = await db.start_many(
                self._pool, [(job_id, attempt) for _, job_id, attempt in batch], self._lease_s
            )
        except TRANSIENT as exc:
            log.warning("cannot start jobs", extra={"jobs": count, "error": repr(exc)})
            for delivery, _, _ in batch:
                await self._settle(delivery, redeliver=True, delay_s=START_RETRY_S)
            return
        for (delivery, job_id, _), job in zip(batch, jobs, strict=True):
            if job is None:
                # Cancelled, already run, or a duplicate message: nothing to do.
                log.debug("announcement skipped", extra={"job_id": job_id})
                await self._settle(delivery)
                continue
            task = asyncio.create_task(self._run(delivery, job))
            self._tasks.add(task)
            task.add_done_callback(self._slot_freed)

    def _slot_freed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _settle(
        self, delivery: Delivery, *, redeliver: bool = False, delay_s: float | None = None
    ) -> None:
        """One of the message's jobs is done with; when all are, ack or give it back."""
        delivery.unsettled -= 1
        if redeliver:
            delivery.redeliver = True
            if delivery.delay_s is None:
                delivery.delay_s = delay_s
        if delivery.unsettled > 0:
            return
        self._deliveries.discard(delivery)
        if delivery.redeliver:
            await _quietly(delivery.message.nak(delay=delivery.delay_s))
        else:
            await _quietly(delivery.message.ack())

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
        each unsettled message is still in progress, and renew all the leases in one
        statement, on a connection of its own so that job writes queueing for the
        pool (after a database outage, say) never hold up the renewal.
        """
        conn: asyncpg.Connection | None = None
        beat_s = min(self._lease_s, broker.ACK_WAIT_S) / 3
        try:
            while True:
                await asyncio.sleep(beat_s)
                for delivery in list(self._deliveries):
                    await _quietly(delivery.message.in_progress())
                live = [r for r in self._running.values() if r.stop is None]
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

    async def _run(self, delivery: Delivery, job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        running = Running(job, task)
        self._running[job.id] = running
        redeliver = False
        try:
            await self._execute(running)
        except asyncio.CancelledError:
            redeliver = await self._stopped(running)
        except Exception:
            # Its lease is no longer renewed: the rescuer takes the job after it.
            log.exception("job handling failed", extra={"job_id": job.id})
        finally:
            self._running.pop(job.id, None)
        await self._settle(delivery, redeliver=redeliver)

    async def _execute(self, running: Running) -> None:
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

    async def _stopped(self, running: Running) -> bool:
        """The attempt was cancelled from outside: finish it the way its reason asks.

        Returns whether the message must be given back for the job to run again.
        """
        job = running.job
        extra = {"job_id": job.id, "attempt": job.attempt}
        try:
            if running.stop is Stop.CANCEL:
                if await db.cancel_running(self._pool, job.id, job.attempt) is not None:
                    self._metrics.jobs_cancelled.labels(job.type, job.queue).inc()
                    log.info("job cancelled while running", extra=extra)
            elif running.stop is Stop.LOST:
                log.warning("lease lost; attempt abandoned", extra=extra)
            elif await db.hand_back(self._pool, job.id, job.attempt):
                self._metrics.jobs_handed_back.labels(job.type, job.queue).inc()
                log.warning("job handed back unfinished", extra=extra)
                return True
        except TRANSIENT as exc:
            # Still RUNNING: its lease runs out and the rescuer takes the job.
            log.error("cannot record the stop", extra={**extra, "error": repr(exc)})
        return False


async def _quietly(call: Any) -> None:
    """Acks and naks are best effort: a lost one means a redelivery, which is harmless."""
    try:
        await call
    except Exception as exc:
        log.debug("ack not delivered", extra={"error": repr(exc)})
