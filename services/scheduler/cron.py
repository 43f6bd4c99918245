"""The cron actor: every scheduler fires the schedules that are due.

Each round locks the due schedules (``FOR UPDATE SKIP LOCKED``), creates the
job of each tick to fire and moves ``next_tick_at`` on, in one transaction. So a
tick gets its job exactly once, however many schedulers run: a scheduler killed
in the middle commits nothing, and the next round of any scheduler fires the
tick (a killed session's locks go with it). Every scheduler runs this actor, not
only the maintenance leader, so a dead scheduler delays no tick.

Which ticks of a due schedule fire (``plan``):

- a tick at most ``catch_up_seconds`` late fires, each with its own job (so a
  scheduler failover or a short outage loses none);
- older ticks were *missed* (every scheduler was away): with ``missed`` "skip"
  they create no job; with "run_once", one job is created for the latest of
  them;
- with ``overlap`` "skip", a tick whose schedule's previous job has not finished
  creates no job.

At most ``MAX_TICKS`` ticks are handled per schedule and round; the rest wait
for the next round.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from orchestrix.backoff import sleep_unless_stopped
from orchestrix.cron import Cron
from orchestrix.db import schedules as db
from orchestrix.db.pool import TRANSIENT
from orchestrix.metrics import SchedulerMetrics

log = logging.getLogger("scheduler")
# How often each scheduler looks for due schedules: a tick fires this late at most
# (plus the round itself).
LOOK_EVERY_S = 0.2
# Schedules fired per transaction, and ticks per schedule and round.
BATCH = 100
MAX_TICKS = 1_000


@dataclass(frozen=True)
class Plan:
    fire: list[datetime]  # ticks that get a job, in order
    missed: int  # ticks older than the catch-up window that get none
    next_tick_at: datetime | None  # the first tick not handled by this plan


def plan(cron: Cron, schedule: db.Schedule, now: datetime) -> Plan:
    """Which ticks of a due schedule fire at ``now`` (missed policy only; overlap
    is decided against the database)."""
    first = schedule.next_tick_at
    assert first is not None  # only due schedules are planned
    window_start = now - timedelta(seconds=schedule.catch_up_seconds)
    fire: list[datetime] = []
    missed = 0
    if first < window_start:
        # Missed ticks: counted (up to MAX_TICKS) without a job each.
        latest_missed = first
        missed = 1
        for old in cron.ticks_after(first):
            if old >= window_start or missed >= MAX_TICKS:
                break
            latest_missed = old
            missed += 1
        if schedule.missed == "run_once":
            fire.append(latest_missed)
            missed -= 1
        start = cron.next_after(max(latest_missed, window_start - timedelta(microseconds=1)))
    else:
        start = first
    tick = start
    while tick is not None and tick <= now and len(fire) < MAX_TICKS:
        fire.append(tick)
        tick = cron.next_after(tick)
    return Plan(fire=fire, missed=missed, next_tick_at=tick)


class CronFirer:
    """Creates the jobs of due cron ticks: ``run_once`` is one round."""

    def __init__(self, pool: object, metrics: SchedulerMetrics) -> None:
        self._pool = pool
        self._metrics = metrics

    async def run_once(self) -> int:
        """Fire what is due now; the number of jobs created."""
        created = 0
        async with self._pool.acquire() as conn, conn.transaction():  # type: ignore[attr-defined]
            schedules, now = await db.due(conn, BATCH)
            for schedule in schedules:
                assert now is not None
                created += await self._fire(conn, schedule, now)
        return created

    async def _fire(self, conn: object, schedule: db.Schedule, now: datetime) -> int:
        try:
            cron = Cron.parse(schedule.cron, schedule.timezone)
        except ValueError as exc:  # e.g. a time zone this machine's database lacks
            log.error("schedule cannot fire", extra={"schedule": schedule.name, "error": str(exc)})
            await db.advance(conn, schedule.name, None, None, None)
            return 0
        ticks = plan(cron, schedule, now)
        created = 0
        last_tick, last_job = None, None
        busy = schedule.overlap == "skip" and await db.unfinished(conn, schedule.last_job_id)
        overlapped = 0
        for tick in ticks.fire:
            if busy:
                overlapped += 1
                continue
            job_id = await db.insert_tick(conn, schedule, tick)
            last_tick = tick
            if job_id is not None:
                created += 1
                last_job = job_id
                busy = schedule.overlap == "skip"
        await db.advance(conn, schedule.name, ticks.next_tick_at, last_tick, last_job)
        self._metrics.schedule_ticks.labels("created").inc(created)
        self._metrics.schedule_ticks.labels("missed").inc(ticks.missed)
        self._metrics.schedule_ticks.labels("overlapped").inc(overlapped)
        if ticks.missed or overlapped:
            log.info(
                "schedule ticks skipped",
                extra={"schedule": schedule.name, "missed": ticks.missed, "overlapped": overlapped},
            )
        return created

    async def run(self, stop: asyncio.Event) -> None:
        while not await sleep_unless_stopped(stop, LOOK_EVERY_S):
            try:
                await self.run_once()
            except TRANSIENT as exc:
                log.warning("schedules not fired; retrying", extra={"error": repr(exc)})
            except Exception:
                log.exception("schedules not fired")
