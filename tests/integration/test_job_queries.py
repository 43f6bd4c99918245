"""The pipeline's queries on a real database: claims, plans, and every guarded transition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from orchestrix.db import events
from orchestrix.db import jobs as db
from orchestrix.db.pool import init_connection
from orchestrix.models import Job, NewJob
from orchestrix.states import (
    CANCELLABLE_AT_ONCE,
    CLAIMABLE,
    RETRYABLE_BY_HAND,
    JobState,
    can_transition,
    sources_of,
)

WORKER = "worker-1"
S = JobState


async def add(pool: asyncpg.Pool, **fields: object) -> str:
    job, _ = await db.insert(pool, NewJob(type=str(fields.pop("type", "t")), **fields))  # type: ignore[arg-type]
    return job.id


async def claim(
    conn: Any,
    limit: int = 100,
    *,
    types: tuple[str, ...] = ("t",),
    queues: tuple[str, ...] | None = None,
    worker_id: str = WORKER,
    lease_s: float = 30.0,
) -> list[Job]:
    return await db.claim(
        conn, worker_id=worker_id, queues=queues, types=types, limit=limit, lease_s=lease_s
    )


async def get(pool: asyncpg.Pool, job_id: str) -> Job:
    job = await db.get(pool, job_id)
    assert job is not None
    return job


async def backlog(pool: asyncpg.Pool, n: int, *, prefix: str = "0", **columns: str) -> None:
    """``n`` due PENDING jobs of type t in one statement, ids ``prefix`` + n zero-padded;
    ``columns``: SQL expressions for other columns."""
    columns = {"type": "'t'", **columns}
    await pool.execute(
        f"INSERT INTO jobs (id, {', '.join(columns)}) "
        f"SELECT $1 || lpad(n::text, {26 - len(prefix)}, '0'), {', '.join(columns.values())} "
        "FROM generate_series(1, $2) AS n",
        prefix,
        n,
    )


def backlog_id(n: int, prefix: str = "0") -> str:
    return prefix + str(n).rjust(26 - len(prefix), "0")


@contextlib.asynccontextmanager
async def as_worker(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection opened as a worker opens its own."""
    conn = await asyncpg.connect(database, server_settings=db.CLAIM_SERVER_SETTINGS)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


async def running_job(
    pool: asyncpg.Pool, lease_s: float = 30, *, worker_id: str = WORKER, **fields: object
) -> str:
    """A new job, claimed: no other job of its type may be due."""
    job_id = await add(pool, **fields)
    job_type = (await get(pool, job_id)).type
    claimed = await claim(pool, types=(job_type,), worker_id=worker_id, lease_s=lease_s)
    assert [job.id for job in claimed] == [job_id]
    return job_id


async def lease_left(pool: asyncpg.Pool, job_id: str) -> timedelta:
    left: timedelta = await pool.fetchval(
        "SELECT lease_expires_at - now() FROM jobs WHERE id = $1", job_id
    )
    return left


# --- claims ----------------------------------------------------------------------


async def test_claim_takes_due_jobs_by_priority_then_run_at(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    low_old = await add(pool, priority=1, run_at=now - timedelta(seconds=30))
    high = await add(pool, priority=5, run_at=now - timedelta(seconds=1))
    low_new = await add(pool, priority=1, run_at=now - timedelta(seconds=10))
    future = await add(pool, priority=9, run_at=now + timedelta(hours=1))

    order = [job.id for job in await claim(pool, 1)]
    order += [job.id for job in await claim(pool, 1)]
    order += [job.id for job in await claim(pool, 10)]
    assert order == [high, low_old, low_new]
    assert await claim(pool, 10) == []
    assert (await get(pool, future)).state is S.PENDING


async def test_claim_starts_the_attempt_for_the_worker(pool: asyncpg.Pool) -> None:
    job_id = await add(pool, queue="emails")
    [claimed] = await claim(pool, 10, lease_s=45.0)
    assert (claimed.id, claimed.queue, claimed.state) == (job_id, "emails", S.RUNNING)
    assert (claimed.attempt, claimed.worker_id) == (1, WORKER)
    assert claimed.started_at is not None
    assert await get(pool, job_id) == claimed
    lease = await pool.fetchval(
        "SELECT lease_expires_at - started_at FROM jobs WHERE id = $1", job_id
    )
    assert lease == timedelta(seconds=45)


async def test_claim_takes_a_retrying_job_once_its_run_at_passed(pool: asyncpg.Pool) -> None:
    due, later = await add(pool), await add(pool)
    assert len(await claim(pool)) == 2
    assert await db.retry(pool, due, 1, "boom", 0.0) is not None
    assert await db.retry(pool, later, 1, "boom", 3600.0) is not None
    [again] = await claim(pool)
    assert (again.id, again.state, again.attempt) == (due, S.RUNNING, 2)
    assert (await get(pool, later)).state is S.RETRYING


async def test_claim_takes_only_the_types_and_queues_the_worker_serves(
    pool: asyncpg.Pool,
) -> None:
    jobs = {
        (queue, job_type): await add(pool, queue=queue, type=job_type)
        for queue in ("q1", "q2", "q3")
        for job_type in ("a", "b", "c")
    }

    async def taken(queues: tuple[str, ...] | None, types: tuple[str, ...]) -> set[str]:
        return {job.id for job in await claim(pool, queues=queues, types=types)}

    assert await taken(("q1", "q2"), ("a", "c")) == {
        jobs[q, t] for q in ("q1", "q2") for t in ("a", "c")
    }
    assert await taken((), ("a", "b", "c")) == set()
    assert await taken(None, ("b",)) == {jobs[q, "b"] for q in ("q1", "q2", "q3")}
    assert await taken(None, ("a", "c")) == {jobs["q3", t] for t in ("a", "c")}


async def test_backlogged_queues_take_turns(pool: asyncpg.Pool) -> None:
    # Queue a's jobs are all older than queue b's: ordered by age alone, a would
    # take every slot.
    await backlog(pool, 50, prefix="1", queue="'a'", run_at="now() - interval '1 hour'")
    await backlog(pool, 50, prefix="2", queue="'b'")
    claimed = await claim(pool, 10)
    assert sorted(job.queue for job in claimed) == ["a"] * 5 + ["b"] * 5


async def test_a_quiet_queues_job_is_in_the_first_claim(pool: asyncpg.Pool) -> None:
    # Older and of a higher priority: priority orders jobs within a queue, not across.
    await backlog(pool, 200, queue="'busy'", priority="10", run_at="now() - interval '1 hour'")
    quiet = await add(pool, queue="quiet")
    claimed = [job.id for job in await claim(pool, 2)]
    assert quiet in claimed


async def test_a_high_priority_job_is_in_the_next_claim_after_a_backlog(
    pool: asyncpg.Pool, database: str
) -> None:
    await backlog(pool, 20_000)
    urgent = await add(pool, priority=100)
    async with as_worker(database) as conn:
        assert [job.id for job in await claim(conn, 1)] == [urgent]
        assert [job.id for job in await claim(conn, 1)] == [backlog_id(1)]


async def test_concurrent_claims_never_share_a_job(pool: asyncpg.Pool, database: str) -> None:
    for n, (queue, job_type) in enumerate((("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"))):
        await backlog(pool, 150, prefix=str(n), queue=f"'{queue}'", type=f"'{job_type}'")
    claimed: list[str] = []
    async with as_worker(database) as first, as_worker(database) as second:
        for _ in range(100):  # a bound: 600 jobs, at least 40 a round
            rounds = await asyncio.gather(
                claim(first, 40, types=("x", "y")), claim(second, 40, types=("x", "y"))
            )
            batch = [job.id for jobs in rounds for job in jobs]
            if not batch:
                break
            claimed += batch
    assert len(claimed) == len(set(claimed)) == 600


async def test_claim_without_free_slots_or_types_asks_nothing(database: str) -> None:
    closed = await asyncpg.connect(database)
    await closed.close()  # any query on it would raise
    assert await claim(closed, 0) == []
    assert await claim(closed, -1) == []
    assert await claim(closed, 10, types=()) == []


# --- plans -----------------------------------------------------------------------


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def scans_of_jobs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        node
        for node in nodes(plan)
        if node["Node Type"].endswith("Scan") and node.get("Relation Name") == "jobs"
    ]


def lookup_by_id(node: dict[str, Any]) -> bool:
    """Whether ``node`` finds its rows of jobs by id through an index: jobs_pkey, or
    (PostgreSQL 18's skip scan) an index that leads with a column of few values and
    then id, such as jobs_state_id_idx."""
    if node["Node Type"] == "Bitmap Heap Scan":
        scans = [child for child in nodes(node) if child is not node]
    elif node["Node Type"] == "Index Scan":
        scans = [node]
    else:
        return False
    return bool(scans) and all(
        scan["Node Type"] in {"Index Scan", "Bitmap Index Scan"}
        and re.fullmatch(r"\(id = \w+\.id\)", scan.get("Index Cond", "")) is not None
        for scan in scans
    )


def buffers(node: dict[str, Any]) -> int:
    return int(node["Shared Hit Blocks"]) + int(node["Shared Read Blocks"])


async def explain(conn: Any, sql: str, *args: object, options: str = "") -> dict[str, Any]:
    """The plan of ``sql`` (FORMAT JSON), rolled back when ``options`` has ANALYZE."""
    text = f"EXPLAIN ({options + ', ' if options else ''}FORMAT JSON) {sql}"
    tx = conn.transaction()
    await tx.start()
    try:
        [row] = await conn.fetch(text, *args)
    finally:
        await tx.rollback()
    # A list already when the connection decodes json (init_connection), else text.
    plans = json.loads(row[0]) if isinstance(row[0], str) else row[0]
    plan: dict[str, Any] = plans[0]["Plan"]
    return plan


async def claim_plan(conn: Any, limit: int, *, generic: bool, options: str = "") -> dict[str, Any]:
    """The plan a claim of ``limit`` jobs of type t in any queue runs; ``generic``: the
    plan a prepared statement may settle on after a few executions."""
    if not generic:
        return await explain(conn, db._CLAIM, None, ["t"], limit, WORKER, 30.0, options=options)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE generic_claim(text[], text[], int, text, float8) AS {db._CLAIM}")
    try:
        return await explain(
            conn, f"EXECUTE generic_claim(NULL, '{{t}}', {limit}, '{WORKER}', 30)", options=options
        )
    finally:
        await conn.execute("DEALLOCATE generic_claim")
        await conn.execute("RESET plan_cache_mode")


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
@pytest.mark.parametrize("finished", [0, 50_000], ids=["fresh", "analyzed-finished"])
async def test_claim_walks_the_claim_index_even_before_the_table_is_analyzed(
    pool: asyncpg.Pool, database: str, generic: bool, finished: int
) -> None:
    if finished:
        # Statistics from a table of finished jobs only: they say nothing waits.
        await pool.execute(
            "INSERT INTO jobs (id, type, state, attempt, completed_at) "
            "SELECT '1' || lpad(n::text, 25, '0'), 't', 'SUCCEEDED', 1, now() "
            "FROM generate_series(1, $1) AS n",
            finished,
        )
        await pool.execute("ANALYZE jobs")
    # A burst of jobs the planner has no statistics for: it could sort them all.
    await backlog(pool, 20_000)
    async with as_worker(database) as conn:
        plan = await claim_plan(conn, 100, generic=generic)
        assert "Seq Scan" not in {node["Node Type"] for node in scans_of_jobs(plan)}
        assert "jobs_claim_idx" in {node.get("Index Name") for node in scans_of_jobs(plan)}
        # The claim sorts its few candidates (read through a CTE), never the jobs.
        for sort in (node for node in nodes(plan) if node["Node Type"] == "Sort"):
            assert scans_of_jobs(sort) == [], sort

        run = await claim_plan(conn, 100, generic=generic, options="ANALYZE, BUFFERS")
        scans = scans_of_jobs(run)
        read = [(node.get("Index Name"), node["Actual Rows"], buffers(node)) for node in scans]
        # No scan reads more jobs than the claim takes. Finding them reads a few
        # pages of the claim index (sorting the backlog instead reads all of it
        # and its rows, 550 buffers here); the update then looks each job up by
        # id, a root-to-leaf walk and the row: an index scan of jobs_pkey, or a
        # bitmap scan of one row a loop (once in a CI run, after autovacuum had
        # been at the table), or in PostgreSQL 18 a skip scan of (state, id) (once
        # in CI: 578 buffers for the 100).
        assert max(rows for _, rows, _ in read) <= 100, read
        assert sum(b for index, _, b in read if index == "jobs_claim_idx") <= 50, read
        by_key = [node for node in scans if node.get("Index Name") != "jobs_claim_idx"]
        assert [lookup_by_id(node) for node in by_key] == [True], by_key
        assert buffers(by_key[0]) <= 8 * 100, read

        claimed = await claim(conn, 100)
    assert [job.id for job in claimed] == [backlog_id(n) for n in range(1, 101)]


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        (db._SUCCEED_MANY, ([None] * 100, WORKER)),
        (db._RENEW_LEASES, (30.0, WORKER)),
        (db._TAKE_BACK, (["RETRYING"] * 100, [1.0] * 100, "WorkerLost", None)),
    ],
    ids=["succeed_many", "renew_leases", "take_back"],
)
async def test_batched_updates_find_their_jobs_by_primary_key(
    pool: asyncpg.Pool, sql: str, args: tuple[object, ...]
) -> None:
    # Statistics from before a burst: then no job was running; now 20,000 are.
    await backlog(pool, 20_000)
    await pool.execute("ANALYZE jobs")
    await pool.execute(
        "UPDATE jobs SET state = 'RUNNING', attempt = 1, worker_id = $1, started_at = now(), "
        "lease_expires_at = now() + interval '30 seconds'",
        WORKER,
    )
    batch = [backlog_id(n) for n in range(1, 101)]
    async with pool.acquire() as conn:
        plan = await explain(conn, sql, batch, [1] * 100, *args)
    indexes = {node.get("Index Name") for node in scans_of_jobs(plan)}
    assert indexes == {"jobs_pkey"}, indexes


# --- the guarded transitions -------------------------------------------------------


async def in_state(pool: asyncpg.Pool, state: JobState) -> Job:
    """A due job in ``state``, with the columns the pipeline would have given it."""
    job_id = await add(pool, max_attempts=3)
    await pool.execute(
        """
        UPDATE jobs
        SET state = $2,
            attempt = CASE WHEN $2 IN ('PENDING', 'WAITING') THEN 0 ELSE 1 END,
            worker_id = CASE WHEN $2 IN ('PENDING', 'WAITING') THEN NULL ELSE $3 END,
            started_at = CASE WHEN $2 IN ('PENDING', 'WAITING') THEN NULL ELSE now() END,
            waiting_for = CASE WHEN $2 = 'WAITING' THEN 1 ELSE 0 END,
            lease_expires_at = CASE WHEN $2 = 'RUNNING' THEN now() + interval '30 seconds' END,
            completed_at = CASE WHEN $2 IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN now() END,
            run_at = now() - interval '1 second'
        WHERE id = $1
        """,
        job_id,
        state.value,
        WORKER,
    )
    return await get(pool, job_id)


def lost(job: Job, *, cancel: bool = False) -> db.Lost:
    return db.Lost(job.id, job.type, job.queue, job.attempt, job.max_attempts, cancel)


async def _claim(pool: asyncpg.Pool, job: Job) -> JobState | None:
    return next((c.state for c in await claim(pool) if c.id == job.id), None)


async def _succeed(pool: asyncpg.Pool, job: Job) -> JobState | None:
    done = await db.succeed(pool, job.id, job.attempt, {"ok": True})
    return None if done is None else done.state


async def _succeed_many(pool: asyncpg.Pool, job: Job) -> JobState | None:
    [written] = await db.succeed_many(pool, [(job.id, job.attempt, {"ok": True})])
    return S.SUCCEEDED if written else None


async def _retry(pool: asyncpg.Pool, job: Job) -> JobState | None:
    retried = await db.retry(pool, job.id, job.attempt, "boom", 10.0)
    return None if retried is None else retried.state


async def _fail(pool: asyncpg.Pool, job: Job) -> JobState | None:
    failed = await db.fail(pool, job.id, job.attempt, "boom")
    return None if failed is None else failed.state


async def _hand_back(pool: asyncpg.Pool, job: Job) -> JobState | None:
    return await db.hand_back(pool, job.id, job.attempt)


async def _hand_back_cancelled(pool: asyncpg.Pool, job: Job) -> JobState | None:
    # Set directly: the API asks only running jobs, but the guard must hold anyway.
    await pool.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = $1", job.id)
    return await db.hand_back(pool, job.id, job.attempt)


async def _snooze(pool: asyncpg.Pool, job: Job) -> JobState | None:
    return await db.snooze(pool, job.id, job.attempt, 5.0)


async def _retry_by_hand(pool: asyncpg.Pool, job: Job) -> JobState | None:
    retried = await db.retry_by_hand(pool, job.id)
    return None if retried is None else retried.state


async def _cancel(pool: asyncpg.Pool, job: Job) -> JobState | None:
    cancelled = await db.cancel(pool, job.id)
    return None if cancelled is None else cancelled.state


async def _cancel_running(pool: asyncpg.Pool, job: Job) -> JobState | None:
    cancelled = await db.cancel_running(pool, job.id, job.attempt)
    return None if cancelled is None else cancelled.state


def _take_back(to: JobState) -> Callable[[asyncpg.Pool, Job], Awaitable[JobState | None]]:
    async def move(pool: asyncpg.Pool, job: Job) -> JobState | None:
        rescued = await db.take_back(pool, [(lost(job), to, 10.0)], "WorkerLost: gone")
        return rescued[0].state if rescued else None

    return move


@dataclass(frozen=True)
class Move:
    name: str
    run: Callable[[asyncpg.Pool, Job], Awaitable[JobState | None]]
    target: JobState
    sources: frozenset[JobState]  # the states it applies in, read from orchestrix.states


ONLY_RUNNING = sources_of(S.CANCELLED) - CANCELLABLE_AT_ONCE
MOVES = [
    Move("claim", _claim, S.RUNNING, CLAIMABLE),
    Move("succeed", _succeed, S.SUCCEEDED, sources_of(S.SUCCEEDED)),
    Move("succeed_many", _succeed_many, S.SUCCEEDED, sources_of(S.SUCCEEDED)),
    Move("retry", _retry, S.RETRYING, sources_of(S.RETRYING)),
    Move("fail", _fail, S.FAILED, sources_of(S.FAILED)),
    Move("hand_back", _hand_back, S.PENDING, frozenset({S.RUNNING})),
    Move("snooze", _snooze, S.PENDING, frozenset({S.RUNNING})),
    Move("retry_by_hand", _retry_by_hand, S.PENDING, RETRYABLE_BY_HAND),
    Move("hand_back_cancelled", _hand_back_cancelled, S.CANCELLED, ONLY_RUNNING),
    Move("cancel", _cancel, S.CANCELLED, CANCELLABLE_AT_ONCE),
    Move("cancel_running", _cancel_running, S.CANCELLED, ONLY_RUNNING),
    Move("take_back_retrying", _take_back(S.RETRYING), S.RETRYING, sources_of(S.RETRYING)),
    Move("take_back_failed", _take_back(S.FAILED), S.FAILED, sources_of(S.FAILED)),
    Move("take_back_cancelled", _take_back(S.CANCELLED), S.CANCELLED, ONLY_RUNNING),
]


# The moves a worker makes: their events name it.
WORKERS_MOVES = {
    "claim",
    "succeed",
    "succeed_many",
    "retry",
    "fail",
    "hand_back",
    "hand_back_cancelled",
    "snooze",
    "cancel_running",
}


def test_the_moves_follow_the_state_table() -> None:
    assert sources_of(S.RUNNING) == CLAIMABLE
    assert {S.RUNNING} == ONLY_RUNNING
    for move in MOVES:
        assert move.sources, move.name
        assert all(can_transition(source, move.target) for source in move.sources), move.name


@pytest.mark.parametrize("start", list(S), ids=[s.value for s in S])
@pytest.mark.parametrize("move", MOVES, ids=[m.name for m in MOVES])
async def test_every_update_is_guarded_by_its_from_state(
    pool: asyncpg.Pool, move: Move, start: JobState
) -> None:
    job = await in_state(pool, start)
    before = await events.for_job(pool, job.id)
    moved = await move.run(pool, job)
    after = await get(pool, job.id)
    written = (await events.for_job(pool, job.id))[len(before) :]
    if start in move.sources:
        assert moved is after.state is move.target
        # Its event, written with it: from where to where, for which attempt.
        [event] = written
        ran = job.attempt + 1 if move.target is S.RUNNING else job.attempt
        assert (event.from_state, event.to_state, event.attempt) == (start, move.target, ran)
        assert (event.queue, event.type) == (job.queue, job.type)
        assert event.at == after.updated_at
        if move.name in WORKERS_MOVES:
            assert event.actor == f"worker:{WORKER}"
    else:
        assert moved is None
        assert written == []
        assert (after.state, after.attempt, after.updated_at) == (
            start,
            job.attempt,
            job.updated_at,
        )


# --- the worker's writes -----------------------------------------------------------


async def test_an_attempt_retried_then_failed(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool, max_attempts=2)
    retrying = await db.retry(pool, job_id, 1, "boom", 0.0)
    assert retrying is not None
    assert retrying.state is S.RETRYING
    assert retrying.last_error == "boom"
    assert [e["attempt"] for e in retrying.errors] == [1]
    assert await db.succeed(pool, job_id, 1, {"late": True}) is None  # a late worker

    [again] = await claim(pool)
    assert again.attempt == 2
    assert await db.fail(pool, job_id, 1, "stale") is None  # the earlier attempt
    failed = await db.fail(pool, job_id, 2, "boom again")
    assert failed is not None
    assert failed.state is S.FAILED
    assert failed.completed_at is not None
    assert [e["error"] for e in failed.errors] == ["boom", "boom again"]
    assert [e["attempt"] for e in failed.errors] == [1, 2]


async def test_retry_pushes_run_at_out(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool)
    before = datetime.now(UTC)
    job = await db.retry(pool, job_id, 1, "x", 30.0)
    assert job is not None
    assert job.run_at >= before + timedelta(seconds=29)
    assert await claim(pool) == []  # not due yet


async def test_succeed_stores_the_result(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool)
    job = await db.succeed(pool, job_id, 1, {"answer": [42, "ß"]})
    assert job is not None
    assert job.result == {"answer": [42, "ß"]}
    assert job.state is S.SUCCEEDED
    assert job.completed_at is not None


async def test_batched_successes_keep_the_guards(pool: asyncpg.Pool) -> None:
    first, second = await running_job(pool), await running_job(pool)
    assert await db.succeed_many(pool, [(first, 2, None), (second, 1, {"ok": 1})]) == [
        False,
        True,
    ]
    assert (await get(pool, first)).state is S.RUNNING
    assert (await get(pool, second)).result == {"ok": 1}


@pytest.mark.parametrize("bad", ["\u0000"])
async def test_results_postgres_refuses_raise_data_errors(pool: asyncpg.Pool, bad: str) -> None:
    job_id = await running_job(pool)
    with pytest.raises(asyncpg.DataError):
        await db.succeed(pool, job_id, 1, {"s": bad})


async def test_hand_back_returns_the_attempt_uncounted(pool: asyncpg.Pool) -> None:
    job_id = await add(pool, run_at=datetime.now(UTC) - timedelta(hours=1))
    await claim(pool)
    assert await db.hand_back(pool, job_id, 2) is None  # not the running attempt
    assert await db.hand_back(pool, job_id, 1) is S.PENDING
    job = await get(pool, job_id)
    assert (job.state, job.attempt, job.handoffs) == (S.PENDING, 0, 1)
    assert (job.started_at, job.completed_at) == (None, None)
    # Due at once, not at its old run_at: behind the jobs that came after it.
    assert job.run_at == job.updated_at
    lease = await pool.fetchval("SELECT lease_expires_at FROM jobs WHERE id = $1", job_id)
    assert lease is None

    [again] = await claim(pool)
    assert (again.attempt, again.handoffs) == (1, 1)
    assert await db.hand_back(pool, job_id, 1, counted=False) is S.PENDING
    assert (await get(pool, job_id)).handoffs == 1
    [again] = await claim(pool)
    assert await db.succeed(pool, job_id, 1, None) is not None


async def test_hand_back_honours_a_cancel_request(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool)
    assert await db.request_cancel(pool, job_id) is not None
    assert await db.hand_back(pool, job_id, 1) is S.CANCELLED
    job = await get(pool, job_id)
    assert (job.state, job.attempt) == (S.CANCELLED, 1)
    assert job.completed_at is not None
    assert await claim(pool) == []


async def test_orphans_are_the_workers_running_jobs_it_does_not_know(
    pool: asyncpg.Pool,
) -> None:
    known, lost_a, lost_b = [await running_job(pool) for _ in range(3)]
    await running_job(pool, worker_id="another")
    done = await running_job(pool)
    await db.succeed(pool, done, 1, None)
    await add(pool)  # pending
    # Only claims older than the bound: one answering now is not an orphan.
    assert await db.orphans(pool, WORKER, [known], older_than_s=60) == []
    await pool.execute("UPDATE jobs SET started_at = started_at - interval '2 minutes'")
    found = await db.orphans(pool, WORKER, [known], older_than_s=60)
    assert sorted(found) == sorted([(lost_a, 1), (lost_b, 1)])
    assert len(await db.orphans(pool, WORKER, [], older_than_s=60)) == 3


async def test_a_workers_writes_touch_only_its_own_run(pool: asyncpg.Pool) -> None:
    # A hand-back gives the attempt number back: the next run, by another worker,
    # has the same (id, attempt). A late write of the first worker must not touch it.
    job_id = await running_job(pool)
    assert await db.hand_back(pool, job_id, 1, worker_id=WORKER) is S.PENDING
    assert await claim(pool, worker_id="second") != []
    mine: dict[str, Any] = {"worker_id": WORKER}
    assert await db.hand_back(pool, job_id, 1, **mine) is None
    assert await db.succeed(pool, job_id, 1, None, **mine) is None
    assert await db.succeed_many(pool, [(job_id, 1, None)], **mine) == [False]
    assert await db.retry(pool, job_id, 1, "late", 0.0, **mine) is None
    assert await db.fail(pool, job_id, 1, "late", **mine) is None
    assert await db.cancel_running(pool, job_id, 1, **mine) is None
    assert await db.renew_leases(pool, {job_id: 1}, 30, **mine) == db.Renewal(set(), {job_id})
    job = await get(pool, job_id)
    assert (job.state, job.worker_id) == (S.RUNNING, "second")
    assert await db.succeed(pool, job_id, 1, None, worker_id="second") is not None


async def test_a_cancelled_job_cannot_be_claimed(pool: asyncpg.Pool) -> None:
    job_id = await add(pool)
    assert await db.cancel(pool, job_id) is not None
    assert await claim(pool) == []


async def test_waiting_by_queue(pool: asyncpg.Pool) -> None:
    await add(pool, queue="a")
    await add(pool, queue="a", run_at=datetime.now(UTC) + timedelta(hours=1))
    await add(pool, queue="b")
    depths = {d.queue: d for d in await db.waiting_by_queue(pool)}
    assert depths["a"].waiting == 2
    assert depths["b"].waiting == 1
    assert depths["a"].oldest_due is not None


# --- leases, rescue, cancelling running jobs ------------------------------------------


async def test_renewal_extends_leases_and_reports_cancels_and_losses(pool: asyncpg.Pool) -> None:
    keep, cancel, rescued = [await running_job(pool, 1) for _ in range(3)]
    await db.request_cancel(pool, cancel)
    await pool.execute("UPDATE jobs SET state = 'RETRYING' WHERE id = $1", rescued)
    renewal = await db.renew_leases(pool, {keep: 1, cancel: 1, rescued: 1}, 60)
    assert renewal.cancel == {cancel}
    assert renewal.lost == {rescued}
    assert await lease_left(pool, keep) > timedelta(seconds=55)
    assert await db.renew_leases(pool, {keep: 2}, 60) == db.Renewal(set(), {keep})


async def test_renew_nothing_and_take_back_nothing_ask_nothing(database: str) -> None:
    closed = await asyncpg.connect(database)
    await closed.close()
    assert await db.renew_leases(closed, {}, 60) == db.Renewal(set(), set())
    assert await db.take_back(closed, [], "WorkerLost") == []


async def expire(pool: asyncpg.Pool, job_ids: list[str], ago_s: float) -> None:
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - make_interval(secs => $2) WHERE id = ANY($1)",
        job_ids,
        ago_s,
    )


async def test_expired_leases_are_taken_back_after_the_grace_only(
    pool: asyncpg.Pool, database: str
) -> None:
    retry = await running_job(pool, max_attempts=3)
    last = await running_job(pool, max_attempts=1)
    cancelled = await running_job(pool)
    recent = await running_job(pool)
    alive = await running_job(pool)
    await db.request_cancel(pool, cancelled)
    await expire(pool, [retry, last, cancelled], 10)
    await expire(pool, [recent], 0.5)

    async with pool.acquire() as conn, conn.transaction():
        assert await db.lost_by_lease(conn, limit=100, grace_s=30) == []  # within the grace
        found = await db.lost_by_lease(conn, limit=100, grace_s=2)
        assert {job.id: (job.max_attempts, job.cancel_requested) for job in found} == {
            retry: (3, False),
            last: (1, False),
            cancelled: (3, True),
        }
        # Locked until this transaction ends: a second rescuer finds none of them.
        async with as_worker(database) as other:
            assert await db.lost_by_lease(other, limit=100, grace_s=2) == []
        decide = {retry: (S.RETRYING, 20.0), last: (S.FAILED, 0.0), cancelled: (S.CANCELLED, 0.0)}
        rescued = await db.take_back(
            conn, [(job, *decide[job.id]) for job in found], "WorkerLost: gone"
        )
    assert {r.id: (r.state, r.attempt) for r in rescued} == {
        retry: (S.RETRYING, 1),
        last: (S.FAILED, 1),
        cancelled: (S.CANCELLED, 1),
    }

    job = await get(pool, retry)
    assert job.last_error == "WorkerLost: gone"
    assert [(e["attempt"], e["error"]) for e in job.errors] == [(1, "WorkerLost: gone")]
    assert job.run_at - job.updated_at == timedelta(seconds=20)  # the delay given
    assert job.completed_at is None
    assert job.handoffs == 0
    assert await pool.fetchval("SELECT lease_expires_at FROM jobs WHERE id = $1", retry) is None
    for job_id in (last, cancelled):
        assert (await get(pool, job_id)).completed_at is not None
    for job_id in (recent, alive):
        assert (await get(pool, job_id)).state is S.RUNNING
    # The worker that lost the job cannot overwrite the rescue.
    assert await db.succeed(pool, retry, 1, None) is None


async def test_take_back_leaves_a_job_that_moved_meanwhile(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool)
    await expire(pool, [job_id], 10)
    # Read without the transaction that would have kept it locked.
    [stale] = await db.lost_by_lease(pool, limit=10, grace_s=1)
    assert await db.take_back(pool, [(stale, S.RETRYING, 0.0)], "WorkerLost") != []
    [again] = await claim(pool)
    assert again.attempt == 2
    await expire(pool, [job_id], 10)

    assert await db.take_back(pool, [(stale, S.FAILED, 0.0)], "WorkerLost") == []
    job = await get(pool, job_id)
    assert (job.state, job.attempt, len(job.errors)) == (S.RUNNING, 2, 1)


async def test_the_jobs_of_dead_workers_are_taken_back(pool: asyncpg.Pool) -> None:
    dead = [await running_job(pool) for _ in range(2)]
    alive = await running_job(pool, worker_id="alive")
    async with pool.acquire() as conn, conn.transaction():
        found = await db.lost_by_worker(conn, [WORKER, "gone-too"], limit=100)
        assert sorted(job.id for job in found) == sorted(dead)
        rescued = await db.take_back(
            conn, [(job, S.RETRYING, 0.0) for job in found], "WorkerLost: died"
        )
    assert sorted(r.id for r in rescued) == sorted(dead)
    # Due at once: the worker died, not the job.
    assert sorted(job.id for job in await claim(pool, worker_id="new")) == sorted(dead)
    assert (await get(pool, alive)).state is S.RUNNING


async def test_cancel_running_is_guarded_by_attempt(pool: asyncpg.Pool) -> None:
    job_id = await running_job(pool)
    assert await db.request_cancel(pool, await add(pool)) is None  # PENDING: not running
    assert await db.cancel_running(pool, job_id, 2) is None
    cancelled = await db.cancel_running(pool, job_id, 1)
    assert cancelled is not None
    assert cancelled.state is S.CANCELLED
    assert cancelled.completed_at is not None
