"""The worker's main loop in this process, on real servers: what stops a job and
what must not, and how many jobs it holds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import nats
import pytest
from orchestrix.db import jobs as db
from orchestrix.db import rate_limits
from orchestrix.executors import JobContext, Registry, Snooze
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job, NewJob
from orchestrix.settings import Settings

from services.worker.consumer import Consumer, Phase
from tests.conftest import RUN_ID


async def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def consumer_of(
    pool: asyncpg.Pool, settings: Settings, registry: Registry, *, concurrency: int = 100
) -> AsyncIterator[Consumer]:
    """A Consumer running in this process, on subjects of its own; stopped on exit."""
    nats_settings = dataclasses.replace(settings.nats, subject_prefix=f"orxtest.c{RUN_ID}.jobs")
    worker = dataclasses.replace(settings.worker, concurrency=concurrency)
    settings = dataclasses.replace(settings, nats=nats_settings, worker=worker)
    nc = await nats.connect(list(settings.nats.servers))
    metrics = WorkerMetrics(concurrency)
    metrics.preset(registry.types(), ["default"])  # as the worker process does
    consumer = Consumer(pool, nc, settings, registry, metrics)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
        await nc.close()


@contextlib.asynccontextmanager
async def transaction_on(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection in an open transaction, rolled back on exit: its row locks
    hold the worker's writes to those rows until then."""
    conn = await asyncpg.connect(url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield conn
    finally:
        await transaction.rollback()
        await conn.close()


async def test_a_lost_lease_reported_while_the_success_is_being_written_stops_nothing(
    pool: asyncpg.Pool, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Fault 9: a renewal whose snapshot still holds a job finds it no longer
    # RUNNING when that job's batched success commits first, and reports it lost
    # while the worker is still recording the outcome. The success must stand and
    # count once; nothing may cancel the write.
    release = asyncio.Event()

    async def held(ctx: JobContext) -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    registry = Registry()
    registry.register("held", held)
    job, _ = await db.insert(pool, NewJob(type="held"))
    async with consumer_of(pool, settings, registry) as consumer:
        try:
            await _until(lambda: job.id in consumer._running, 10, "the job to be claimed")
            running = consumer._running[job.id]
            async with transaction_on(settings.database.url) as lock:
                await lock.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job.id)
                release.set()
                await _until(lambda: running.phase is Phase.RECORDING, 5, "the outcome write")
                await asyncio.sleep(0.2)  # the batched UPDATE is at the server, waiting
                consumer._apply(db.Renewal(cancel=set(), lost={job.id}))
            await _until(lambda: job.id not in consumer._running, 10, "the outcome to be written")
        finally:
            release.set()
        assert not running.task.cancelled()
        row = await pool.fetchrow("SELECT state, attempt FROM jobs WHERE id = $1", job.id)
        assert (row["state"], row["attempt"]) == ("SUCCEEDED", 1)
        succeeded = consumer._metrics.registry.get_sample_value(
            "orchestrix_jobs_succeeded_total", {"type": "held", "queue": "default"}
        )
        assert succeeded == 1
    assert "abandoned" not in caplog.text


async def test_slots_free_while_outcomes_are_written_but_held_jobs_stay_bounded(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    # Each job, before it returns, has the test lock its row: every success write
    # waits. A job being recorded frees its slot, so the worker claims on, but it
    # holds at most twice its concurrency, and never executes more than it.
    concurrency = 2
    executing, most_executing = 0, 0
    one_at_a_time = asyncio.Lock()  # on the test's one connection
    released = False
    async with transaction_on(settings.database.url) as lock:

        async def locks_its_row(ctx: JobContext) -> None:
            nonlocal executing, most_executing
            executing += 1
            most_executing = max(most_executing, executing)
            await asyncio.sleep(0.05)
            async with one_at_a_time:
                if not released:
                    await lock.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", ctx.id)
            executing -= 1

        registry = Registry()
        registry.register("locks", locks_its_row)
        for _ in range(10):
            await db.insert(pool, NewJob(type="locks"))
        async with consumer_of(pool, settings, registry, concurrency=concurrency) as consumer:
            await _until(lambda: len(consumer._running) == 2 * concurrency, 10, "4 held jobs")
            await asyncio.sleep(1.5)  # past the poll: a claim would have happened
            assert len(consumer._running) == 2 * concurrency
            pending = await pool.fetchval("SELECT count(*) FROM jobs WHERE state = 'PENDING'")
            assert pending == 10 - 2 * concurrency
            async with one_at_a_time:
                released = True
                await lock.execute("ROLLBACK; BEGIN")  # the writes go through
            # Every outcome written: the held ones, then the rest, claimed as slots free
            # (an empty _running may only be the moment between two claims).
            deadline = time.monotonic() + 10
            while await pool.fetchval("SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'"):
                assert time.monotonic() < deadline, "the jobs did not all succeed"
                await asyncio.sleep(0.01)
    assert most_executing <= concurrency


async def test_jobs_a_rate_limit_holds_back_start_before_the_next_poll(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """20 jobs under 20 starts/s, burst 2, on a worker that polls every 30 s: once
    the bucket is empty and nothing runs, the worker looks again within
    LIMITED_LOOK_S, not at its poll, so all start within about a second."""
    settings = dataclasses.replace(
        settings, worker=dataclasses.replace(settings.worker, poll_interval_s=30.0)
    )
    await rate_limits.create(pool, "twenty", 20.0, 2)
    for _ in range(20):
        await db.insert(pool, NewJob(type="quick", rate_limit="twenty"))
    registry = Registry()
    registry.register("quick", lambda ctx: None)
    async with consumer_of(pool, settings, registry):
        began = time.monotonic()
        while await pool.fetchval("SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'"):
            assert time.monotonic() - began < 10, "held-back jobs waited for the poll"
            await asyncio.sleep(0.05)


# --- what executors can say besides success and failure ----------------------------


async def _settled(pool: asyncpg.Pool, job_id: str, timeout_s: float = 15) -> asyncpg.Record:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        if row["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {row['state']}")
        await asyncio.sleep(0.05)


async def test_progress_is_shown_on_the_job_while_it_runs(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    release = asyncio.Event()

    async def reports(ctx: JobContext) -> str:
        for done in (10, 50, 90):
            ctx.progress({"percent": done})
        await release.wait()
        return "ok"

    def reports_from_a_thread(ctx: JobContext) -> str:
        ctx.progress("halfway")
        time.sleep(1.5)
        return "ok"

    registry = Registry()
    registry.register("reports", reports)
    registry.register("threaded", reports_from_a_thread)
    job, _ = await db.insert(pool, NewJob(type="reports"))
    threaded, _ = await db.insert(pool, NewJob(type="threaded"))
    async with consumer_of(pool, settings, registry):
        try:
            deadline = time.monotonic() + 5
            while True:
                rows = {
                    row["id"]: row
                    for row in await pool.fetch(
                        "SELECT id, progress, progress_at FROM jobs WHERE id = ANY($1::text[])",
                        [job.id, threaded.id],
                    )
                }
                if rows[job.id]["progress"] is not None and rows[threaded.id]["progress"]:
                    break
                assert time.monotonic() < deadline, "no progress written"
                await asyncio.sleep(0.1)
            # Only the latest report counts.
            assert rows[job.id]["progress"] == {"percent": 90}
            assert rows[job.id]["progress_at"] is not None
            assert rows[threaded.id]["progress"] == "halfway"
        finally:
            release.set()
        row = await _settled(pool, job.id)
        assert (row["state"], row["progress"]) == ("SUCCEEDED", {"percent": 90})


def test_progress_refuses_what_is_not_small_json() -> None:
    ctx = JobContext.of(
        Job.from_row(
            {
                **dict.fromkeys(Job.__dataclass_fields__),
                "id": "x",
                "state": "RUNNING",
                "errors": [],
                "handoffs": 0,
            }
        )
    )
    with pytest.raises(ValueError, match="JSON value"):
        ctx.progress({1, 2})
    with pytest.raises(ValueError, match="at most"):
        ctx.progress("x" * 70_000)
    ctx.progress({"fine": True})  # outside a worker, a report goes nowhere


async def test_a_snooze_runs_the_job_again_later_without_using_an_attempt(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    starts: list[tuple[int, float]] = []

    async def snoozes_once(ctx: JobContext) -> str:
        starts.append((ctx.attempt, time.monotonic()))
        if len(starts) == 1:
            raise Snooze(0.5)
        return "done"

    registry = Registry()
    registry.register("snoozy", snoozes_once)
    # One attempt only: a snooze must not use it up.
    job, _ = await db.insert(pool, NewJob(type="snoozy", max_attempts=1))
    async with consumer_of(pool, settings, registry) as consumer:
        row = await _settled(pool, job.id)
        snoozed = consumer._metrics.registry.get_sample_value(
            "orchestrix_jobs_snoozed_total", {"type": "snoozy", "queue": "default"}
        )
    assert (row["state"], row["attempt"], row["result"], row["errors"]) == (
        "SUCCEEDED",
        1,
        "done",
        [],
    )
    assert [attempt for attempt, _ in starts] == [1, 1]
    assert starts[1][1] - starts[0][1] >= 0.5
    assert snoozed == 1


async def test_a_snooze_of_a_job_whose_cancel_was_asked_for_cancels_it(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    async def snoozes(ctx: JobContext) -> None:
        await pool.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = $1", ctx.id)
        raise Snooze(60)

    registry = Registry()
    registry.register("snoozes", snoozes)
    job, _ = await db.insert(pool, NewJob(type="snoozes"))
    async with consumer_of(pool, settings, registry):
        row = await _settled(pool, job.id)
    assert row["state"] == "CANCELLED"


@pytest.mark.parametrize("in_a_thread", [False, True])
async def test_an_executor_extends_its_own_timeout(
    pool: asyncpg.Pool, settings: Settings, in_a_thread: bool
) -> None:
    async def extends(ctx: JobContext) -> str:
        if ctx.payload["extend"]:
            ctx.extend_timeout(5)
        await asyncio.sleep(2)
        return "in time"

    def extends_in_thread(ctx: JobContext) -> str:
        if ctx.payload["extend"]:
            ctx.extend_timeout(5)
        time.sleep(2)
        return "in time"

    registry = Registry()
    registry.register("slow", extends_in_thread if in_a_thread else extends)
    # A timeout of 1 s: 2 s of work fit only with the extension.
    extended, _ = await db.insert(
        pool, NewJob(type="slow", timeout_seconds=1, max_attempts=1, payload={"extend": True})
    )
    plain, _ = await db.insert(
        pool, NewJob(type="slow", timeout_seconds=1, max_attempts=1, payload={"extend": False})
    )
    async with consumer_of(pool, settings, registry):
        done = await _settled(pool, extended.id)
        timed_out = await _settled(pool, plain.id)
    assert (done["state"], done["result"]) == ("SUCCEEDED", "in time")
    assert timed_out["state"] == "FAILED"
    assert timed_out["last_error"].startswith("JobTimeout")
