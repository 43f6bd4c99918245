"""The lifeline on a real PostgreSQL and NATS: a worker is dead only when its session
is gone *and* NATS says no one listens on its subject, at every look for CONFIRM_S."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import nats
from nats.aio.msg import Msg
from orchestrix import broker
from orchestrix.db import jobs as db
from orchestrix.db import workers
from orchestrix.liveness import CONFIRM_S, LOOK_EVERY_S
from orchestrix.metrics import SchedulerMetrics
from orchestrix.models import NewJob
from orchestrix.services.scheduler.lifeline import Lifeline
from orchestrix.settings import RetrySettings, Settings
from orchestrix.states import JobState

from tests.conftest import RUN_ID


async def worker_with_a_job(pool: asyncpg.Pool, database: str, worker_id: str) -> str:
    """A registered worker whose session has ended, holding one RUNNING job."""
    conn = await asyncpg.connect(database)
    await workers.register(conn, workers.Registration(worker_id, "host", 1, None, ["t"], 1))
    await conn.close()
    job, _ = await db.insert(pool, NewJob(type="t"))
    (claimed,) = await db.claim(
        pool, worker_id=worker_id, queues=None, types=["t"], limit=1, lease_s=3600
    )
    assert claimed.id == job.id
    return job.id


async def state(pool: asyncpg.Pool, job_id: str) -> JobState:
    job = await db.get(pool, job_id)
    assert job is not None
    return job.state


async def test_a_worker_gone_from_both_loses_its_jobs_only_after_confirm(
    pool: asyncpg.Pool, database: str, settings: Settings
) -> None:
    nats_settings = replace(settings.nats, subject_prefix=f"lifeline.{RUN_ID}")
    dead = await worker_with_a_job(pool, database, "dead-worker")
    alive = await worker_with_a_job(pool, database, "cut-from-postgres")
    nc = await nats.connect(list(settings.nats.servers))
    try:

        async def here(message: Msg) -> None:
            await message.respond(b"here")

        # Its session is gone too, but it still answers on NATS: alive, cut off.
        await nc.subscribe(broker.worker_subject(nats_settings, "cut-from-postgres"), cb=here)
        await nc.flush()
        lifeline = Lifeline(pool, nc, nats_settings, RetrySettings(), SchedulerMetrics())
        now = 1000.0
        assert await lifeline.run_once(now) == 0  # first seen gone
        while now < 1000.0 + CONFIRM_S - LOOK_EVERY_S:
            now += LOOK_EVERY_S
            assert await lifeline.run_once(now) == 0
        assert await state(pool, dead) is JobState.RUNNING
        assert await lifeline.run_once(1000.0 + CONFIRM_S) == 1
        rescued = await db.get(pool, dead)
        assert rescued is not None
        assert (rescued.state, rescued.attempt) == (JobState.RETRYING, 1)
        assert rescued.last_error is not None
        assert rescued.last_error.startswith("WorkerLost")
        # Due again at once: its worker died, the job did not fail.
        assert rescued.run_at <= rescued.updated_at
        assert await state(pool, alive) is JobState.RUNNING
        assert await workers.session_gone(pool) == ["cut-from-postgres"]
    finally:
        await nc.close()


async def test_a_gap_between_looks_starts_the_wait_again(
    pool: asyncpg.Pool, database: str, settings: Settings
) -> None:
    nats_settings = replace(settings.nats, subject_prefix=f"lifeline-gap.{RUN_ID}")
    dead = await worker_with_a_job(pool, database, "dead-worker")
    nc = await nats.connect(list(settings.nats.servers))
    try:
        lifeline = Lifeline(pool, nc, nats_settings, RetrySettings(), SchedulerMetrics())
        assert await lifeline.run_once(1000.0) == 0
        # The next look comes late: the worker may have been back in between, so
        # the wait starts again from this look.
        late = 1000.0 + CONFIRM_S
        assert await lifeline.run_once(late) == 0
        now = late
        while now + LOOK_EVERY_S < late + CONFIRM_S:
            now += LOOK_EVERY_S
            assert await lifeline.run_once(now) == 0
        assert await state(pool, dead) is JobState.RUNNING
        assert await lifeline.run_once(late + CONFIRM_S) == 1
    finally:
        await nc.close()
