"""The worker's main loop: claim jobs for free slots, run them, write their outcomes.

The worker decides what it runs when a slot is free, not before: it claims due
jobs of its queues (WORKER_QUEUES) and of the types it has executors for, in
priority order within a queue, the queues taking turns (``db.jobs.claim``), and
moves them straight to RUNNING. So a priority-1000 job created behind 100,000
others starts at the next free slot, a quiet queue is not stuck behind a busy
one, and a job whose type no worker knows waits instead of failing.

When to claim (flow control): a wake-up (jobs were created, on NATS), the poll
(WORKER_POLL_INTERVAL, for jobs that become due later and as a fallback) or,
while the queue has jobs, enough freed slots (a quarter of them), so a busy
worker claims in batches rather than one job at a time. Nothing is claimed
while the heartbeat cannot reach PostgreSQL, or while the worker stops.

The heartbeat (services/worker/heartbeat.py) renews leases and fences; stops
(services/worker/stops.py) say what a stopped attempt writes; the completer
writes outcomes; the progress writer (services/worker/progress.py) writes what
executors report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from orchestrix import broker, ids
from orchestrix.db import concurrency, workers, workflows
from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.errors import Kind
from orchestrix.executors import JobContext, Registry
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job
from orchestrix.services.worker import runner
from orchestrix.services.worker.completer import Completer
from orchestrix.services.worker.heartbeat import Heartbeat
from orchestrix.services.worker.progress import ProgressWriter
from orchestrix.services.worker.stops import (
    LEDGER_TIMEOUT_S,
    MAX_HANDOFFS,
    WRITE_PATIENCE_S,
    Stop,
    Stopper,
    persist,
)
from orchestrix.services.worker.threads import Threads
from orchestrix.settings import Settings

log = logging.getLogger("worker")
# A claim that has not answered in this long is abandoned; its jobs, if it did
# commit, are found by the heartbeat's reconciliation.
CLAIM_TIMEOUT_S = 5.0
# How often a worker looks for limited jobs (keys, rate limits, running limits)
# while none came its way.
LIMITED_LOOK_S = 0.1
# After a failed claim, wait this long before the next.
CLAIM_RETRY_S = 0.5
# How often the fence is checked.
FENCE_CHECK_S = 0.25


class Phase(Enum):
    EXECUTING = "executing"  # a stop may cancel it
    RECORDING = "recording"  # its outcome is being written: nothing stops it


@dataclass
class Running:
    job: Job
    task: asyncio.Task[None]
    phase: Phase = Phase.EXECUTING
    stop: Stop | None = None
    limited: bool = False  # claimed by the limited claim (db.concurrency)


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
        self.id = ids.new_id()
        self._completer = Completer(pool, settings.retry, metrics, worker_id=self.id)
        self._stopper = Stopper(
            pool,
            self._completer,
            metrics,
            worker_id=self.id,
            ledger=(nc.jetstream(), settings.nats),
        )
        self._concurrency = settings.worker.concurrency
        # Freed slots are claimed for once this many are free (a wake-up claims at once).
        self._batch = max(1, self._concurrency // 4)
        self._queues = settings.worker.queues
        self._types = tuple(registry.types())
        self._lease_s = settings.recovery.lease_timeout_s
        self._threads = Threads(self._concurrency, "executor")
        self._progress = ProgressWriter(pool, self.id)
        self._running: dict[str, Running] = {}  # every held job, until its outcome is written
        self._recording = 0  # of which this many are having their outcome written
        self._wake = asyncio.Event()  # a wake-up or the poll: claim if any slot is free
        self._freed = asyncio.Event()  # a slot was freed
        self._dry = False  # the last claim found fewer jobs than it asked for
        # Limited jobs (db.concurrency) are claimed in turns with the others, by
        # a claim of their own: at once while the last one found some (or one of
        # its jobs ended, making room), else at most every LIMITED_LOOK_S.
        self._limited_active = True
        self._limited_tried = float("-inf")
        self._limited_first = False
        # When the last limited claim left jobs behind (a limit held them, or it
        # could not tell), the next look: LIMITED_LOOK_S after it, not at the poll.
        self._limited_look_at: float | None = None
        self._round = concurrency.Round()  # where its limited claims are in the keys
        self._heartbeat = Heartbeat(
            settings.database.url,
            workers.Registration(
                id=self.id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self._queues,
                types=self._types,
                concurrency=self._concurrency,
            ),
            nc,
            lease_s=self._lease_s,
            running=lambda: {r.job.id: r.job.attempt for r in self._running.values()},
            on_renewal=self._apply,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until ``stop``; then drain within the shutdown timeout."""
        nats = self._settings.nats
        wake = await self._nc.subscribe(broker.wake_subject(nats), cb=self._on_wake)
        # Kept until the last job is settled: cancels still reach a draining worker,
        # and the lifeline must hear it is alive for as long as it runs jobs.
        staying = [
            await self._nc.subscribe(broker.cancel_subject(nats), cb=self._on_cancel_request),
            await self._nc.subscribe(broker.worker_subject(nats, self.id), cb=self._on_probe),
        ]
        beat = asyncio.create_task(self._heartbeat.run())
        fence = asyncio.create_task(self._fence())
        progress = asyncio.create_task(self._progress.run())
        stopped = asyncio.create_task(stop.wait())
        stopped.add_done_callback(lambda _: self._wake.set())
        try:
            registered = asyncio.create_task(self._heartbeat.registered.wait())
            await asyncio.wait([registered, stopped], return_when=asyncio.FIRST_COMPLETED)
            registered.cancel()
            while not stop.is_set():
                if not await self._claim_if_due():
                    await self._wait()
        finally:
            stopped.cancel()
            with contextlib.suppress(Exception):
                await wake.unsubscribe()
            await self._drain()
            for subscription in staying:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            fence.cancel()
            progress.cancel()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self._heartbeat.deregister()
            self._threads.shutdown()

    def _free(self) -> int:
        """Slots for new jobs: a job whose outcome is being written frees its slot,
        so the next claim overlaps the previous batch's write; up to
        ``concurrency`` such jobs, so that held jobs stay bounded when writes are
        slow. A thread still running an abandoned attempt's function holds a slot."""
        executing = len(self._running) - self._recording
        return min(
            self._concurrency - executing - self._threads.abandoned,
            2 * self._concurrency - len(self._running),
        )

    async def _wait(self) -> None:
        """Until a wake-up, the poll, or (while jobs are there) enough freed slots."""
        poll_at = time.monotonic() + self._settings.worker.poll_interval_s
        while not self._wake.is_set():
            # Freed slots are a reason to claim only while PostgreSQL answers: else
            # _claim_if_due returns at once, and so would this, and the loop would
            # spin without ever yielding, the heartbeat starved, for ever.
            if (
                not self._dry
                and self._free() >= self._batch
                and self._heartbeat.reachable(time.monotonic())
            ):
                return
            now = time.monotonic()
            look_at = self._limited_look_at
            look = (
                look_at is not None
                and look_at < poll_at
                and self._free() > 0
                and self._heartbeat.reachable(now)
            )
            remaining = (look_at if look and look_at is not None else poll_at) - now
            if remaining <= 0:
                if look:
                    # At most one such wake-up per LIMITED_LOOK_S, claim or not.
                    self._limited_look_at = now + LIMITED_LOOK_S
                self._wake.set()
                break
            self._freed.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._wake, self._freed)]
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def _claim_if_due(self) -> bool:
        """Claim for the free slots when it is time; True when more may be claimed at once."""
        free = self._free()
        woken = self._wake.is_set()
        self._wake.clear()
        if free <= 0 or not self._heartbeat.reachable(time.monotonic()):
            return False
        if not woken and (self._dry or free < self._batch):
            return False
        # The plain claim and the limited claim (db.concurrency) take turns at
        # going first. Each claim's jobs start before the next claim is sent: the
        # heartbeat hands back jobs claimed for this worker that it does not run.
        limited_due = (
            self._limited_active or time.monotonic() - self._limited_tried >= LIMITED_LOOK_S
        )
        kinds = ("limited", "plain") if self._limited_first else ("plain", "limited")
        self._limited_first = not self._limited_first
        claimed = 0
        for kind in kinds:
            left = free - claimed
            if left <= 0 or (kind == "limited" and not limited_due):
                continue
            sent = time.monotonic()
            try:
                async with asyncio.timeout(CLAIM_TIMEOUT_S):
                    with self._metrics.claim_duration.time():
                        if kind == "plain":
                            jobs = await self._claim_plain(left)
                        else:
                            jobs = await self._claim_limited(left, sent)
            except (*TRANSIENT, TimeoutError) as exc:
                # The server may have committed: the heartbeat finds such jobs and
                # hands them back.
                log.warning("claim failed", extra={"error": repr(exc)})
                await asyncio.sleep(CLAIM_RETRY_S)
                return False
            self._heartbeat.leased([job.id for job in jobs], sent)
            for job in jobs:
                self._start(job, limited=kind == "limited")
            claimed += len(jobs)
        self._dry = claimed < free
        return not self._dry

    async def _claim_plain(self, limit: int) -> list[Job]:
        return await db.claim(
            self._pool,
            worker_id=self.id,
            queues=self._queues,
            types=self._types,
            limit=limit,
            lease_s=self._lease_s,
        )

    async def _claim_limited(self, limit: int, now: float) -> list[Job]:
        """Limited jobs, if any wait: one probe while none came, else the limited claim."""
        self._limited_tried = now
        if not self._limited_active and not await concurrency.any_waiting(self._pool):
            self._limited_look_at = None
            return []
        async with self._pool.acquire() as conn:
            jobs = await concurrency.claim(
                conn,
                worker_id=self.id,
                queues=self._queues,
                types=self._types,
                limit=limit,
                lease_s=self._lease_s,
                round_=self._round,
            )
        self._limited_active = len(jobs) > 0
        self._limited_look_at = now + LIMITED_LOOK_S if len(jobs) < limit else None
        return jobs

    def _start(self, job: Job, *, limited: bool = False) -> None:
        started = job.started_at or job.run_at
        labels = self._metrics.known.job(job.type, job.queue)
        self._metrics.jobs_claimed.labels(*labels).inc()
        self._metrics.start_latency.labels(*labels).observe(
            max(0.0, (started - job.run_at).total_seconds())
        )
        task = asyncio.create_task(self._run(job))
        self._running[job.id] = Running(job, task, limited=limited)
        task.add_done_callback(lambda _: self._release(job.id))

    def _recording_started(self, running: Running) -> None:
        """``running``'s attempt has ended: its slot is free while its outcome is written."""
        running.phase = Phase.RECORDING
        self._recording += 1
        self._freed.set()

    def _release(self, job_id: str) -> None:
        running = self._running.pop(job_id, None)
        if running is not None and running.limited:
            # Room under its limits, here or elsewhere: claim limited jobs at once.
            self._limited_active = True
            self._dry = False
        if running is not None and running.phase is Phase.RECORDING:
            self._recording -= 1
        self._heartbeat.forget(job_id)
        self._freed.set()

    async def _drain(self) -> None:
        tasks = [r.task for r in self._running.values()]
        if not tasks:
            return
        timeout = self._settings.worker.shutdown_timeout_s
        log.info("draining", extra={"running": len(tasks), "timeout_s": timeout})
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning("grace period over; handing back", extra={"jobs": len(pending)})
            for running in list(self._running.values()):
                self._stop(running, Stop.SHUTDOWN)
        # Hand-backs, and outcomes still waiting for the database, get a bounded time
        # (a hand-back that runs out of it leaves word in the ledger itself).
        _, pending = await asyncio.wait(tasks, timeout=WRITE_PATIENCE_S + LEDGER_TIMEOUT_S + 1)
        if pending:
            log.error("exiting with unwritten outcomes", extra={"jobs": len(pending)})
            stuck = [r.job for r in self._running.values() if r.task in pending]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            # Their outcome is lost with the database away: the attempts are returned
            # (they run again), never counted as failed.
            for job in stuck:
                if job.handoffs < MAX_HANDOFFS:
                    await self._stopper.leave_word(job)

    def _stop(self, running: Running, reason: Stop) -> None:
        if running.stop is None and running.phase is Phase.EXECUTING:
            running.stop = reason
            running.task.cancel()

    async def _on_wake(self, message: Msg) -> None:
        self._wake.set()

    async def _on_probe(self, message: Msg) -> None:
        with contextlib.suppress(Exception):
            await message.respond(b"here")

    async def _on_cancel_request(self, message: Msg) -> None:
        running = self._running.get(message.data.decode(errors="replace"))
        if running is not None:
            log.info("cancellation requested", extra={"job_id": running.job.id})
            self._stop(running, Stop.CANCEL)

    def _apply(self, renewal: db.Renewal) -> None:
        """Stop the jobs a user cancelled, and the ones the rescuer has taken.

        A job whose outcome is being written is left alone: the renewal may have
        missed it only because the write committed first.
        """
        stops = [(i, Stop.CANCEL) for i in renewal.cancel] + [(i, Stop.LOST) for i in renewal.lost]
        for job_id, reason in stops:
            running = self._running.get(job_id)
            if running is not None:
                self._stop(running, reason)

    async def _fence(self) -> None:
        while True:
            await asyncio.sleep(FENCE_CHECK_S)
            for job_id in self._heartbeat.fenced(time.monotonic()):
                running = self._running.get(job_id)
                if running is not None and running.stop is None:
                    log.warning(
                        "lease not renewed in time; stopping the job", extra={"job_id": job_id}
                    )
                    self._stop(running, Stop.FENCED)

    async def _run(self, job: Job) -> None:
        running = self._running[job.id]  # _start registered it before this task ran
        try:
            outcome = await self._execute(job)
        except asyncio.CancelledError:
            self._recording_started(running)
            await self._stopper.finish(job, running.stop or Stop.SHUTDOWN)
            return
        self._recording_started(running)
        extra = {"job_id": job.id, "attempt": job.attempt}
        try:
            # The outcome must be committed: keep trying while the database is away.
            # Should the job move on meanwhile (rescued), the write changes nothing.
            await persist(
                lambda: self._completer.record(job, outcome),
                "record outcome",
                extra,
                patience_s=None,
            )
        except TRANSIENT as exc:
            # Still RUNNING: its lease runs out and the rescuer takes the job.
            log.error("outcome not recorded", extra={**extra, "error": repr(exc)})
        except Exception:
            log.exception("outcome not recorded", extra=extra)

    async def _execute(self, job: Job) -> runner.Outcome:
        labels = self._metrics.known.job(job.type, job.queue)
        log.debug("job started", extra={"job_id": job.id, "type": job.type, "attempt": job.attempt})
        self._metrics.slots_busy.inc()
        clock = time.perf_counter()
        try:
            parents = None
            if job.workflow_id is not None:
                try:
                    parents = await persist(
                        lambda: workflows.parents(self._pool, job.id),
                        "read the parents' results",
                        {"job_id": job.id},
                    )
                except TRANSIENT as exc:
                    return runner.Failure(
                        f"ParentsUnavailable: the parents' results could not be read: {exc!r}",
                        Kind.RETRYABLE,
                    )
            context = JobContext.of(job, parents)
            context.controls.report = self._progress.reporter(job.id, job.attempt)
            outcome = await runner.run(self._registry.get(job.type), context, self._threads)
        finally:
            self._metrics.slots_busy.dec()
        if isinstance(outcome, runner.Success):
            name = "success"
        elif isinstance(outcome, runner.Snoozed):
            name = "snoozed"
        else:
            name = outcome.kind.value
        self._metrics.job_duration.labels(*labels, name).observe(time.perf_counter() - clock)
        return outcome
