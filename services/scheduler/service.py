"""The scheduler process: wake on NOTIFY or the poll, claim, publish; repeat until stopped.

Any number of schedulers may run: claims use SKIP LOCKED, so each due job goes
to one of them. On SIGTERM or SIGINT the scheduler stops claiming, finishes
publishing the batch in hand, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
from orchestrix import broker
from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.lifecycle import connect_both, stop_on_signals
from orchestrix.metrics import SchedulerMetrics
from orchestrix.models import DEFAULT_QUEUE
from orchestrix.settings import Settings
from orchestrix.status import StatusServer, check_dependencies

from services.scheduler.claimer import Claimer
from services.scheduler.depth import DepthReporter
from services.scheduler.leader import Leadership
from services.scheduler.publisher import Publisher
from services.scheduler.republisher import Republisher
from services.scheduler.rescuer import Rescuer

log = logging.getLogger("scheduler")
CHANNEL = "orchestrix_jobs"
DEPTH_INTERVAL_S = 5.0


class Wakeup:
    """A LISTEN connection that sets ``event`` whenever jobs are inserted.

    It reconnects on the next ``ensure()`` after the connection is lost; the
    poll keeps the scheduler working meanwhile.
    """

    def __init__(self, url: str) -> None:
        self.event = asyncio.Event()
        self._url = url
        self._conn: asyncpg.Connection | None = None

    def _notified(self, *args: Any) -> None:
        self.event.set()

    async def ensure(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        try:
            self._conn = await asyncpg.connect(self._url)
            await self._conn.add_listener(CHANNEL, self._notified)
            # Jobs may have arrived while we were not listening.
            self.event.set()
        except TRANSIENT as exc:
            self._conn = None
            log.warning("cannot LISTEN; polling only", extra={"error": repr(exc)})

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()


async def _report_depth(depth: DepthReporter, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await depth.run_once(datetime.now(UTC))
        except TRANSIENT as exc:
            log.warning("queue depth not measured", extra={"error": repr(exc)})
        await sleep_unless_stopped(stop, DEPTH_INTERVAL_S)


async def _maintain(
    leadership: Leadership,
    rescuer: Rescuer,
    republisher: Republisher,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Rescue and republish, in whichever scheduler holds the maintenance lock."""
    lease_s = settings.recovery.lease_timeout_s
    while not await sleep_unless_stopped(stop, settings.recovery.maintenance_interval_s):
        try:
            if not await leadership.held():
                continue
            # A new leader (or one back from a database outage) first gives the
            # workers a full lease to renew theirs, so no live job is taken.
            assert leadership.since is not None
            if time.monotonic() - leadership.since >= lease_s:
                await rescuer.run_once()
            await republisher.run_once()
        except TRANSIENT as exc:
            log.warning("maintenance failed; retrying", extra={"error": repr(exc)})
        except Exception as exc:  # NATS errors while republishing; next round tries again
            log.warning("maintenance failed", extra={"error": repr(exc)})


async def serve(settings: Settings) -> None:
    stop = stop_on_signals()
    connected = await connect_both(
        settings, "orchestrix-scheduler", stop, server_settings=db.SCHEDULER_SERVER_SETTINGS
    )
    if connected is None:
        return
    pool, nc = connected
    js = nc.jetstream()
    if not await broker.ensure_with_backoff(
        lambda: broker.ensure_stream(js, settings.nats), "jetstream stream", stop
    ):
        await nc.close()
        await pool.close()
        return

    metrics = SchedulerMetrics()
    metrics.preset((DEFAULT_QUEUE,))
    status = StatusServer(
        settings.metrics, metrics.registry, lambda: check_dependencies(pool, nc), stop
    )
    await status.start()
    wakeup = Wakeup(settings.database.url)
    publisher = Publisher(js, settings.nats, settings.scheduler.jobs_per_message)
    claimer = Claimer(pool, publisher, metrics, settings.scheduler.batch_size)
    depth_task = asyncio.create_task(_report_depth(DepthReporter(pool, metrics), stop))
    leadership = Leadership(settings.database.url)
    maintenance = asyncio.create_task(
        _maintain(
            leadership,
            Rescuer(pool, settings.recovery, settings.retry, metrics),
            Republisher(pool, js, publisher, settings.nats, settings.recovery, metrics),
            settings,
            stop,
        )
    )
    log.info(
        "scheduler started",
        extra={
            "stream": settings.nats.stream,
            "batch_size": settings.scheduler.batch_size,
            "jobs_per_message": settings.scheduler.jobs_per_message,
            "poll_interval_s": settings.scheduler.poll_interval_s,
        },
    )
    failures = 0
    try:
        while not stop.is_set():
            await wakeup.ensure()
            # Cleared before claiming: a NOTIFY that lands during the claim
            # wakes the next wait instead of being lost.
            wakeup.event.clear()
            try:
                claimed = await claimer.run_once()
                failures = 0
            except Exception as exc:  # the loop must outlive any outage; it backs off
                failures += 1
                log.warning("claim failed; retrying", extra={"error": repr(exc)})
                await sleep_unless_stopped(stop, min(5.0, 0.1 * 2**failures))
                continue
            if claimed >= settings.scheduler.batch_size:
                continue  # more are due: no waiting
            if claimer.unpublished:
                await sleep_unless_stopped(stop, 0.5)
                continue
            waiter = asyncio.create_task(wakeup.event.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait(
                [waiter, stopper],
                timeout=settings.scheduler.poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiter.cancel()
            stopper.cancel()
    finally:
        log.info("scheduler stopping: no more claims")
        for task in (depth_task, maintenance):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await leadership.release()
        if claimer.unpublished:
            # They stay SCHEDULED with no message: the republisher of whichever
            # scheduler leads maintenance announces them after REPUBLISH_AFTER.
            count = sum(len(message.jobs) for message in claimer.unpublished)
            log.warning("stopping with unpublished jobs", extra={"count": count})
        await wakeup.close()
        await nc.drain()
        await pool.close()
        await status.stop()
        log.info("scheduler stopped")
