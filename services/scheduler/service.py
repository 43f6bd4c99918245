"""The scheduler process: wake workers when jobs arrive, and keep every job owned.

Workers claim their own jobs; the scheduler makes that fast and safe:

- the waker turns PostgreSQL's NOTIFY on insert into a NATS wake-up;
- the ledger applier hands back attempts that workers returned on NATS when
  they had to exit while PostgreSQL was away;
- the lifeline takes back the jobs of workers that died (seconds);
- the rescuer takes back jobs whose lease ran out (a worker alive but stuck);
- the pruner deletes finished jobs once their retention has passed;
- the counter folds the job count deltas into the counts /api/v1/stats reads;
- the depth reporter keeps the queue gauges current (for the known queues, the
  rest as ``other``: orchestrix.labels);
- the cron firer creates the jobs of due cron schedules;
- the settler cancels what waits for a workflow's job that failed or was cancelled.

Any number of schedulers may run. Every one wakes workers, fires schedules
(each tick once: services/scheduler/cron.py) and settles workflows; the
lifeline and the rescuer run in the one that holds the maintenance lock, and so
do the pruner and the counter (as tasks of their own, beside the maintenance
round, which they must not slow). On SIGTERM or SIGINT the scheduler stops and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from orchestrix import broker
from orchestrix.backoff import sleep_unless_stopped
from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.labels import LabelFollower
from orchestrix.lifecycle import connect_both, stop_on_signals
from orchestrix.liveness import LOOK_EVERY_S
from orchestrix.metrics import KnownLabels, SchedulerMetrics
from orchestrix.services.scheduler.counter import CountFolder
from orchestrix.services.scheduler.cron import CronFirer
from orchestrix.services.scheduler.depth import DepthReporter
from orchestrix.services.scheduler.handbacks import HandBackApplier
from orchestrix.services.scheduler.leader import Leadership
from orchestrix.services.scheduler.lifeline import Lifeline
from orchestrix.services.scheduler.pruner import Pruner
from orchestrix.services.scheduler.rescuer import Rescuer
from orchestrix.services.scheduler.settler import Settler
from orchestrix.services.scheduler.waker import Waker
from orchestrix.settings import Settings
from orchestrix.status import StatusServer, check_dependencies

log = logging.getLogger("scheduler")
DEPTH_INTERVAL_S = 5.0
WAKER_RETRY_S = 1.0


async def _report_depth(depth: DepthReporter, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await depth.run_once(datetime.now(UTC))
        except TRANSIENT as exc:
            log.warning("queue depth not measured", extra={"error": repr(exc)})
        await sleep_unless_stopped(stop, DEPTH_INTERVAL_S)


async def _maintain(
    leadership: Leadership,
    ledger: HandBackApplier,
    lifeline: Lifeline,
    rescuer: Rescuer,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Ledger, lifeline and rescuer, in whichever scheduler holds the maintenance lock.

    The ledger goes first: an attempt its worker handed back must not be taken
    for lost.
    """
    lease_s = settings.recovery.lease_timeout_s
    interval_s = min(LOOK_EVERY_S, settings.recovery.maintenance_interval_s)
    rescued_at = float("-inf")
    while not await sleep_unless_stopped(stop, interval_s):
        try:
            if not await leadership.held():
                continue
            try:
                await ledger.run_once()
            except TRANSIENT:
                raise
            except Exception as exc:  # NATS away: nothing can be in a ledger we cannot read
                log.warning("hand-back ledger not read", extra={"error": repr(exc)})
            await lifeline.run_once()
            now = time.monotonic()
            # A new leader (or one back from a database outage) first gives the
            # workers a full lease to renew theirs, so no live job is taken.
            assert leadership.since is not None
            due = now - rescued_at >= settings.recovery.maintenance_interval_s
            if due and now - leadership.since >= lease_s:
                rescued_at = now
                await rescuer.run_once()
        except TRANSIENT as exc:
            log.warning("maintenance failed; retrying", extra={"error": repr(exc)})
        except Exception as exc:  # NATS errors of the lifeline; the next round tries again
            log.warning("maintenance failed", extra={"error": repr(exc)})


async def serve(settings: Settings) -> None:
    stop = stop_on_signals()
    connected = await connect_both(
        settings, "scheduler", stop, server_settings=db.CLAIM_SERVER_SETTINGS
    )
    if connected is None:
        return
    pool, nc = connected
    metrics = SchedulerMetrics(known=KnownLabels(settings.metrics.queues))
    metrics.preset(metrics.known.queues)
    status = StatusServer(
        settings.metrics,
        metrics.registry,
        lambda: check_dependencies(pool, nc),
        stop,
        metrics.dependency_up,
    )
    await status.start()
    waker = Waker(settings.database.url, nc, settings.nats)
    labels_task = asyncio.create_task(LabelFollower(pool, metrics.known).run_forever(stop))
    depth_task = asyncio.create_task(_report_depth(DepthReporter(pool, metrics), stop))
    cron_task = asyncio.create_task(CronFirer(pool, metrics).run(stop))
    settler_task = asyncio.create_task(Settler(pool).run(stop))
    leadership = Leadership(settings.database.url)
    ledger = HandBackApplier(pool, nc.jetstream(), settings.nats, metrics)
    maintenance = asyncio.create_task(
        _maintain(
            leadership,
            ledger,
            Lifeline(pool, nc, settings.nats, settings.retry, metrics),
            Rescuer(pool, settings.recovery, settings.retry, metrics),
            settings,
            stop,
        )
    )
    # Leadership is checked by the maintenance round; the pruner reads its answer.
    prune_task = asyncio.create_task(
        Pruner(pool, settings.retention, metrics).run(stop, lambda: leadership.leading)
    )
    count_task = asyncio.create_task(CountFolder(pool).run(stop, lambda: leadership.leading))
    log.info("scheduler started", extra={"lease_timeout_s": settings.recovery.lease_timeout_s})
    try:
        while not stop.is_set():
            await waker.run_once()
            await sleep_unless_stopped(stop, WAKER_RETRY_S)
    finally:
        log.info("scheduler stopping")
        for task in (
            labels_task,
            depth_task,
            cron_task,
            settler_task,
            maintenance,
            prune_task,
            count_task,
        ):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await leadership.release()
        await waker.close()
        # Before the drain: draining a pull subscription waits out its timeout (30 s).
        await ledger.close()
        await broker.disconnect(nc)
        await pool.close()
        await status.stop()
        log.info("scheduler stopped")
