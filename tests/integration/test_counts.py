"""The job counts (migration 0015, orchestrix.db.counts) and the scheduler's counter,
against the real database: exact after every kind of change, folded or not."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
from orchestrix.db import bulk, jobs, retention
from orchestrix.db import counts as db
from orchestrix.models import NewJob
from orchestrix.services.scheduler.counter import CountFolder
from orchestrix.states import CLAIMABLE, JobState

from tests.integration.test_job_queries import backlog, claim

S = JobState


async def truth(pool: asyncpg.Pool) -> db.Counts:
    """The counts from the jobs themselves: a full pass."""
    rows = await pool.fetch("SELECT queue, type, state, count(*) AS n FROM jobs GROUP BY 1, 2, 3")
    by_state = dict.fromkeys(JobState, 0)
    waiting: Counter[tuple[str, str]] = Counter()
    for row in rows:
        by_state[JobState(row["state"])] += row["n"]
        if JobState(row["state"]) in CLAIMABLE:
            waiting[(row["queue"], row["type"])] += row["n"]
    return db.Counts(by_state, sorted((q, t, n) for (q, t), n in waiting.items()))


async def read(pool: asyncpg.Pool) -> db.Counts:
    counts = await db.read(pool)
    return db.Counts(counts.by_state, sorted(counts.waiting))


async def folded(pool: asyncpg.Pool) -> dict[tuple[str, str, str], int]:
    rows = await pool.fetch("SELECT queue, type, state, n FROM job_counts")
    return {(row["queue"], row["type"], row["state"]): row["n"] for row in rows}


async def assert_exact(pool: asyncpg.Pool, folder: CountFolder, *, fold: bool) -> None:
    """The read matches the jobs; after a fold, so do the folded counts alone."""
    assert await read(pool) == await truth(pool)
    if fold:
        await folder.run_once()
        assert await db.pending(pool) == 0
        rows = await pool.fetch("SELECT queue, type, state, count(*) AS n FROM jobs GROUP BY 1,2,3")
        assert await folded(pool) == {(r["queue"], r["type"], r["state"]): r["n"] for r in rows}
        assert await read(pool) == await truth(pool)


async def test_counts_stay_exact_through_every_kind_of_change(pool: asyncpg.Pool) -> None:
    # A small batch, so a fold takes several transactions.
    folder = CountFolder(pool, batch_size=3)
    fold = False

    async def step() -> None:
        nonlocal fold
        await assert_exact(pool, folder, fold=fold)
        fold = not fold  # every other step leaves its deltas unfolded

    # Creates: one, a batch, a workflow-less future job, two queues, three types.
    await jobs.insert(pool, NewJob(type="t", queue="a"))
    await jobs.insert_many(
        pool, [NewJob(type=t, queue=q) for t in ("t", "u") for q in ("a", "b") for _ in range(5)]
    )
    await jobs.insert(pool, NewJob(type="v", run_at=datetime.now(UTC) + timedelta(hours=1)))
    await backlog(pool, 30, prefix="7", queue="'c'", type="'w'")
    # An idempotency key used again creates nothing, and counts nothing.
    for _ in range(2):
        await jobs.insert(pool, NewJob(type="v", queue="a", idempotency_key="once"))
    await step()

    # Claims, then each outcome a worker writes.
    running = await claim(pool, 21, types=("t", "u"))
    assert len(running) == 21
    await step()
    first, second, third, fourth, *rest = running
    assert await jobs.succeed(pool, first.id, first.attempt, {"ok": 1}) is not None
    written = await jobs.succeed_many(pool, [(j.id, j.attempt, None) for j in rest[:10]])
    assert all(written)
    assert await jobs.retry(pool, second.id, second.attempt, "boom", 0.0) is not None
    assert await jobs.fail(pool, third.id, third.attempt, "bad") is not None
    assert await jobs.hand_back(pool, fourth.id, fourth.attempt) is not None
    await step()

    # A write that changes no state adds no delta row.
    before = await db.pending(pool)
    await pool.execute("UPDATE jobs SET progress = '{\"p\": 1}' WHERE state = 'RUNNING'")
    assert await db.pending(pool) == before

    # Cancels, one and in bulk; retries, one and in bulk.
    waiting = await pool.fetchval("SELECT id FROM jobs WHERE state = 'PENDING' LIMIT 1")
    assert await jobs.cancel(pool, waiting) is not None
    cancelled, asked = await bulk.cancel(pool, bulk.Selection(queue="c"))
    assert cancelled == 30
    assert asked == []
    await step()
    assert await jobs.retry_by_hand(pool, waiting) is not None
    assert await bulk.retry(pool, bulk.Selection(states=[S.CANCELLED, S.FAILED])) == 31
    await step()

    # A rolled-back change leaves nothing behind; history switched off changes nothing here.
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                await conn.execute("UPDATE jobs SET state = 'CANCELLED', completed_at = now()")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        await conn.execute("SET orchestrix.history = off")
        again = await claim(conn, 5, queues=("c",), types=("w",))
        await conn.execute("RESET orchestrix.history")
        assert len(again) == 5
    await step()

    # Pruning, and a plain DELETE.
    await pool.execute(
        "UPDATE jobs SET completed_at = now() - interval '1 day' WHERE completed_at IS NOT NULL"
    )
    assert await retention.prune(pool, S.SUCCEEDED, 60.0, 1000) == 11
    await pool.execute("DELETE FROM jobs WHERE queue = 'b' AND state = 'PENDING'")
    await step()
    await assert_exact(pool, folder, fold=True)


async def test_a_fold_leaves_what_is_not_committed(pool: asyncpg.Pool, database: str) -> None:
    folder = CountFolder(pool)
    await jobs.insert(pool, NewJob(type="t"))
    writer = await asyncpg.connect(database)
    try:
        # Committed after the fold's snapshot, with an earlier id than rows the
        # fold takes: it must be folded next time, not skipped nor counted twice.
        tx = writer.transaction()
        await tx.start()
        await writer.execute(
            "INSERT INTO jobs (id, type) VALUES ('01AAAAAAAAAAAAAAAAAAAAAAA1', 't')"
        )
        await jobs.insert(pool, NewJob(type="t"))
        assert await folder.run_once() == 2
        assert await folded(pool) == {("default", "t", "PENDING"): 2}
        assert await db.pending(pool) == 0  # the open transaction's delta is not visible
        await tx.commit()
        assert await db.pending(pool) == 1
        assert (await read(pool)).by_state[S.PENDING] == 3
        assert await folder.run_once() == 1
        assert await folded(pool) == {("default", "t", "PENDING"): 3}
    finally:
        await writer.close()


async def test_a_second_folder_steps_aside(pool: asyncpg.Pool, database: str) -> None:
    await jobs.insert(pool, NewJob(type="t"))
    other = await asyncpg.connect(database)
    try:
        async with other.transaction():
            assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", db.FOLD_LOCK)
            assert await asyncio.wait_for(CountFolder(pool).run_once(), 5) == 0
            assert await db.pending(pool) == 1
        assert await CountFolder(pool).run_once() == 1
    finally:
        await other.close()


async def test_counts_that_reach_zero_keep_no_row(pool: asyncpg.Pool) -> None:
    folder = CountFolder(pool)
    job, _ = await jobs.insert(pool, NewJob(type="t"))
    await folder.run_once()
    assert await jobs.cancel(pool, job.id) is not None
    await folder.run_once()
    assert await folded(pool) == {("default", "t", "CANCELLED"): 1}
    await pool.execute("DELETE FROM jobs")
    await folder.run_once()
    assert await folded(pool) == {}
    assert await read(pool) == db.Counts(dict.fromkeys(JobState, 0), [])
