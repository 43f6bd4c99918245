"""The pipeline's queries on a real database: claims, and every guarded transition."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from orchestrix.db import jobs as db
from orchestrix.models import NewJob
from orchestrix.states import JobState


async def add(pool: asyncpg.Pool, **fields: object) -> str:
    job, _ = await db.insert(pool, NewJob(type=str(fields.pop("type", "t")), **fields))  # type: ignore[arg-type]
    return job.id


@contextlib.asynccontextmanager
async def as_scheduler(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection opened as the scheduler opens its own."""
    conn = await asyncpg.connect(database, server_settings=db.SCHEDULER_SERVER_SETTINGS)
    try:
        yield conn
    finally:
        await conn.close()


async def explain(conn: Any, sql: str, *args: object) -> str:
    return "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + sql, *args))


async def test_claim_takes_due_jobs_by_priority_then_age(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    low_old = await add(pool, priority=1, run_at=now - timedelta(seconds=30))
    high = await add(pool, priority=5, run_at=now - timedelta(seconds=1))
    low_new = await add(pool, priority=1, run_at=now - timedelta(seconds=10))
    future = await add(pool, priority=9, run_at=now + timedelta(hours=1))

    order = [c.id for c in await db.claim_due(pool, 1)]
    order += [c.id for c in await db.claim_due(pool, 10)]
    assert order == [high, low_old, low_new]
    assert await db.claim_due(pool, 10) == []
    job = await db.get(pool, future)
    assert job is not None
    assert job.state is JobState.PENDING


async def test_claim_walks_the_due_index_even_before_the_table_is_analyzed(
    pool: asyncpg.Pool, database: str
) -> None:
    # A burst of jobs the planner has no statistics for yet: it would sort them all.
    await pool.execute(
        "INSERT INTO jobs (id, type) SELECT lpad(n::text, 26, '0'), 't' "
        "FROM generate_series(1, 20000) AS n"
    )
    async with as_scheduler(database) as conn:
        plan = await explain(conn, db._CLAIM_DUE, 500)
        assert "Index Scan using jobs_due_idx" in plan
        assert "Sort" not in plan
        claimed = await db.claim_due(conn, 500)
    assert [c.id for c in claimed] == [f"{n:026d}" for n in range(1, 501)]


async def test_claim_finds_its_rows_again_by_key_on_a_mid_sized_table(
    pool: asyncpg.Pool, database: str
) -> None:
    # 50,000 finished jobs, analyzed: the size at which the planner would hash
    # the whole table to join the 500 picked rows back.
    await pool.execute(
        "INSERT INTO jobs (id, type, state, attempt, completed_at) "
        "SELECT lpad(n::text, 26, '0'), 't', 'SUCCEEDED', 1, now() "
        "FROM generate_series(1, 50000) AS n"
    )
    await pool.execute(
        "INSERT INTO jobs (id, type) SELECT '7' || lpad(n::text, 25, '0'), 't' "
        "FROM generate_series(1, 1000) AS n"
    )
    await pool.execute("ANALYZE jobs")
    async with as_scheduler(database) as conn:
        plan = await explain(conn, db._CLAIM_DUE, 500)
    assert "Index Scan using jobs_pkey" in plan
    assert "Seq Scan" not in plan


async def test_claim_marks_scheduled_and_counts_the_attempt(pool: asyncpg.Pool) -> None:
    job_id = await add(pool, queue="emails")
    [claimed] = await db.claim_due(pool, 10)
    assert (claimed.id, claimed.queue, claimed.attempt) == (job_id, "emails", 1)
    job = await db.get(pool, job_id)
    assert job is not None
    assert job.state is JobState.SCHEDULED
    assert job.scheduled_at is not None


async def test_concurrent_claims_never_share_a_job(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO jobs (id, type) SELECT $1 || lpad(n::text, 20, '0'), 't' "
        "FROM generate_series(1, 300) n",
        "01ABCD",
    )
    claims = await asyncio.gather(*(db.claim_due(pool, 40) for _ in range(8)))
    claimed = [c.id for batch in claims for c in batch]
    assert len(claimed) == len(set(claimed)) == 300


async def test_the_worker_transitions_are_guarded(pool: asyncpg.Pool) -> None:
    job_id = await add(pool, max_attempts=2)
    assert await db.start(pool, job_id, 1, 30) is None  # still PENDING: not ours to start
    await db.claim_due(pool, 1)
    assert await db.start(pool, job_id, 2, 30) is None  # wrong attempt
    running = await db.start(pool, job_id, 1, 30)
    assert running is not None
    assert running.state is JobState.RUNNING
    assert await db.start(pool, job_id, 1, 30) is None  # a duplicate message

    retrying = await db.retry(pool, job_id, 1, "boom", 0.0)
    assert retrying is not None
    assert retrying.state is JobState.RETRYING
    assert retrying.last_error == "boom"
    assert [e["attempt"] for e in retrying.errors] == [1]
    assert await db.succeed(pool, job_id, 1, {"late": True}) is None  # a late worker

    [again] = await db.claim_due(pool, 1)
    assert again.attempt == 2
    assert await db.start(pool, job_id, 2, 30) is not None
    failed = await db.fail(pool, job_id, 2, "boom again")
    assert failed is not None
    assert failed.state is JobState.FAILED
    assert failed.completed_at is not None
    assert [e["error"] for e in failed.errors] == ["boom", "boom again"]


async def test_retry_pushes_run_at_out(pool: asyncpg.Pool) -> None:
    job_id = await add(pool)
    await db.claim_due(pool, 1)
    await db.start(pool, job_id, 1, 30)
    before = datetime.now(UTC)
    job = await db.retry(pool, job_id, 1, "x", 30.0)
    assert job is not None
    assert job.run_at >= before + timedelta(seconds=29)
    assert await db.claim_due(pool, 10) == []  # not due yet


async def test_succeed_stores_the_result_and_hand_back_keeps_the_attempt(
    pool: asyncpg.Pool,
) -> None:
    done, back = await add(pool), await add(pool)
    await db.claim_due(pool, 10)
    for job_id in (done, back):
        await db.start(pool, job_id, 1, 30)
    job = await db.succeed(pool, done, 1, {"answer": [42, "ß"]})
    assert job is not None
    assert job.result == {"answer": [42, "ß"]}
    assert job.state is JobState.SUCCEEDED

    assert await db.hand_back(pool, back, 1)
    returned = await db.get(pool, back)
    assert returned is not None
    assert (returned.state, returned.attempt, returned.started_at) == (JobState.SCHEDULED, 1, None)
    assert await db.start(pool, back, 1, 30) is not None  # the redelivered message starts it
    assert not await db.hand_back(pool, done, 1)


async def test_a_cancelled_job_cannot_be_started(pool: asyncpg.Pool) -> None:
    job_id = await add(pool)
    await db.claim_due(pool, 1)
    assert await db.cancel(pool, job_id) is not None
    assert await db.start(pool, job_id, 1, 30) is None


async def test_waiting_by_queue(pool: asyncpg.Pool) -> None:
    await add(pool, queue="a")
    await add(pool, queue="a", run_at=datetime.now(UTC) + timedelta(hours=1))
    await add(pool, queue="b")
    depths = {d.queue: d for d in await db.waiting_by_queue(pool)}
    assert depths["a"].waiting == 2
    assert depths["b"].waiting == 1
    assert depths["a"].oldest_due is not None


@pytest.mark.parametrize("bad", ["\u0000"])
async def test_results_postgres_refuses_raise_data_errors(pool: asyncpg.Pool, bad: str) -> None:
    job_id = await add(pool)
    await db.claim_due(pool, 1)
    await db.start(pool, job_id, 1, 30)
    with pytest.raises(asyncpg.DataError):
        await db.succeed(pool, job_id, 1, {"s": bad})


async def running_job(pool: asyncpg.Pool, lease_s: float = 30, **fields: object) -> str:
    job_id = await add(pool, **fields)
    await db.claim_due(pool, 100)
    assert await db.start(pool, job_id, 1, lease_s) is not None
    return job_id


async def test_renewal_extends_leases_and_reports_cancels_and_losses(pool: asyncpg.Pool) -> None:
    keep, cancel, rescued = [await running_job(pool, 1) for _ in range(3)]
    await db.request_cancel(pool, cancel)
    await pool.execute("UPDATE jobs SET state = 'RETRYING' WHERE id = $1", rescued)
    renewal = await db.renew_leases(pool, {keep: 1, cancel: 1, rescued: 1}, 60)
    assert renewal.cancel == {cancel}
    assert renewal.lost == {rescued}
    lease = await pool.fetchval("SELECT lease_expires_at - now() FROM jobs WHERE id = $1", keep)
    assert lease > timedelta(seconds=55)
    assert (await db.renew_leases(pool, {}, 60)) == db.Renewal(set(), set())


async def test_rescue_takes_back_expired_leases_only(pool: asyncpg.Pool) -> None:
    retry = await running_job(pool, max_attempts=3)
    last = await running_job(pool, max_attempts=1)
    cancelled = await running_job(pool)
    alive = await running_job(pool)
    await db.request_cancel(pool, cancelled)
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '5 seconds' WHERE id = ANY($1)",
        [retry, last, cancelled],
    )

    async def rescue(grace_s: float) -> list[db.Rescued]:
        return await db.rescue_expired(
            pool, limit=100, grace_s=grace_s, error="WorkerLost: gone", base_s=10.0, max_s=60.0
        )

    assert await rescue(30) == []  # within the grace
    rescued = {r.id: r.state for r in await rescue(0)}
    assert rescued == {
        retry: JobState.RETRYING,
        last: JobState.FAILED,
        cancelled: JobState.CANCELLED,
    }
    job = await db.get(pool, retry)
    assert job is not None
    assert job.last_error == "WorkerLost: gone"
    assert [e["attempt"] for e in job.errors] == [1]
    assert job.run_at > datetime.now(UTC) + timedelta(seconds=9)  # backoff of attempt 1
    failed = await db.get(pool, last)
    assert failed is not None
    assert failed.completed_at is not None
    still = await db.get(pool, alive)
    assert still is not None
    assert still.state is JobState.RUNNING
    # The worker that lost the job cannot overwrite the rescue.
    assert await db.succeed(pool, retry, 1, None) is None


async def test_republish_picks_stale_scheduled_jobs_once_per_period(pool: asyncpg.Pool) -> None:
    stale, fresh = await add(pool), await add(pool)
    await db.claim_due(pool, 10)
    await pool.execute(
        "UPDATE jobs SET scheduled_at = now() - interval '2 minutes' WHERE id = $1", stale
    )
    again = await db.due_for_republish(pool, older_than_s=60, limit=10)
    assert [(c.id, c.attempt) for c in again] == [(stale, 1)]
    assert await db.due_for_republish(pool, older_than_s=60, limit=10) == []
    job = await db.get(pool, fresh)
    assert job is not None
    assert job.state is JobState.SCHEDULED


async def test_cancel_running_is_guarded_by_attempt(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool)
    assert await db.request_cancel(pool, await add(pool)) is None  # PENDING: not running
    assert await db.cancel_running(pool, job_id, 2) is None
    cancelled = await db.cancel_running(pool, job_id, 1)
    assert cancelled is not None
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.completed_at is not None


async def test_a_retry_after_a_cancel_request_cancels_instead(pool: asyncpg.Pool) -> None:
    asked, failing = await running_job(pool), await running_job(pool)
    for job_id in (asked, failing):
        await db.request_cancel(pool, job_id)
    cancelled = await db.retry(pool, asked, 1, "boom", 0.0)
    assert cancelled is not None
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.completed_at is not None
    assert cancelled.last_error == "boom"
    assert [e["error"] for e in cancelled.errors] == ["boom"]
    assert await db.claim_due(pool, 10) == []
    # A failure for good stands: it is what the attempt came to.
    failed = await db.fail(pool, failing, 1, "boom")
    assert failed is not None
    assert failed.state is JobState.FAILED


async def test_batched_writes_keep_the_guards(pool: asyncpg.Pool) -> None:
    first, second = await add(pool), await add(pool)
    await db.claim_due(pool, 10)
    # Wrong attempt, and the same attempt twice in one batch (a duplicate message).
    started = await db.start_many(pool, [(first, 2), (second, 1), (second, 1)], 30)
    assert started[0] is None
    assert started[1] is not None
    assert started[2] is None
    assert await db.succeed_many(pool, [(first, 1, None), (second, 1, {"ok": 1})]) == [
        False,
        True,
    ]
    job = await db.get(pool, second)
    assert job is not None
    assert job.result == {"ok": 1}


@pytest.mark.parametrize(
    ("sql", "state", "args"),
    [
        (db._START_MANY, "SCHEDULED", (30.0,)),
        (db._SUCCEED_MANY, "RUNNING", ([None] * 100,)),
        (db._RENEW_LEASES, "RUNNING", (30.0,)),
    ],
    ids=["start_many", "succeed_many", "renew_leases"],
)
async def test_batched_updates_find_their_jobs_by_primary_key(
    pool: asyncpg.Pool, sql: str, state: str, args: tuple[object, ...]
) -> None:
    # Statistics from before a burst: then no job was in `state`; now 20,000 are.
    await pool.execute(
        "INSERT INTO jobs (id, type) SELECT lpad(n::text, 26, '0'), 't' "
        "FROM generate_series(1, 20000) AS n"
    )
    await pool.execute("ANALYZE jobs")
    await pool.execute(
        "UPDATE jobs SET state = $1, attempt = 1, scheduled_at = now(), "
        "started_at = CASE WHEN $1 = 'RUNNING' THEN now() END",
        state,
    )
    batch = [f"{n:026d}" for n in range(1, 101)]
    plan = await explain(pool, sql, batch, [1] * 100, *args)
    assert "Index Scan on jobs_pkey" in plan or "Index Scan using jobs_pkey" in plan
    assert "jobs_scheduled_idx" not in plan
    assert "jobs_running_lease_idx" not in plan
    assert "jobs_state_id_idx" not in plan
