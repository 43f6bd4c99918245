"""The pruner on a real PostgreSQL: finished jobs deleted after their state's retention,
in bounded batches, by the maintenance leader only; nothing unfinished ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import asyncpg
import pytest
from orchestrix import ids
from orchestrix.db import events, retention, workflows
from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics
from orchestrix.models import NewJob
from orchestrix.services.scheduler.leader import Leadership
from orchestrix.services.scheduler.pruner import Pruner
from orchestrix.settings import RetentionSettings
from orchestrix.states import JobState
from prometheus_client import CollectorRegistry

from tests.conftest import Api
from tests.faults.proxy import Proxy

HOUR = 3600.0


async def jobs_in(pool: asyncpg.Pool, state: str, count: int, age_s: float) -> list[str]:
    """``count`` jobs in ``state`` whose every timestamp is ``age_s`` seconds old (a
    finished state's ``completed_at`` too; the others have none: the schema's CHECK)."""
    job_ids = [ids.new_id() for _ in range(count)]
    finished = state in ("SUCCEEDED", "FAILED", "CANCELLED")
    await pool.execute(
        """
        INSERT INTO jobs (id, type, state, attempt, run_at, created_at, started_at,
                          completed_at, updated_at, lease_expires_at, worker_id)
        SELECT id, 't', $2, CASE WHEN $2 = 'PENDING' THEN 0 ELSE 1 END, t, t,
               CASE WHEN $2 = 'PENDING' THEN NULL ELSE t END,
               CASE WHEN $3 THEN t END, t,
               CASE WHEN $2 = 'RUNNING' THEN t END,
               CASE WHEN $2 = 'RUNNING' THEN 'w' END
        FROM unnest($1::text[]) AS id, LATERAL (SELECT now() - $4 * interval '1 second') AS ts(t)
        """,
        job_ids,
        state,
        finished,
        age_s,
    )
    return job_ids


async def left(pool: asyncpg.Pool, job_ids: Sequence[str]) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE id = ANY($1::text[])", list(job_ids)
    )
    return count


async def until_left(
    pool: asyncpg.Pool, job_ids: Sequence[str] | None, at_most: int, timeout_s: float
) -> None:
    """Poll until at most ``at_most`` of ``job_ids`` (None: of all jobs) are left."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        now_left = (
            await pool.fetchval("SELECT count(*) FROM jobs")
            if job_ids is None
            else await left(pool, job_ids)
        )
        if now_left <= at_most:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{now_left} jobs left after {timeout_s}s, not {at_most}")
        await asyncio.sleep(0.01)


def pruned(metrics: SchedulerMetrics, state: str) -> float | None:
    return metrics.registry.get_sample_value("orchestrix_jobs_pruned_total", {"state": state})


def pruner(
    pool: asyncpg.Pool | asyncpg.Connection,
    metrics: SchedulerMetrics | None = None,
    *,
    succeeded: float = HOUR,
    cancelled: float = 2 * HOUR,
    failed: float = 3 * HOUR,
    **knobs: float,
) -> Pruner:
    return Pruner(
        pool,
        RetentionSettings(succeeded_s=succeeded, cancelled_s=cancelled, failed_s=failed),
        metrics or SchedulerMetrics(CollectorRegistry()),
        **knobs,  # type: ignore[arg-type]
    )


async def test_each_state_is_kept_for_its_own_retention_and_counted(pool: asyncpg.Pool) -> None:
    metrics = SchedulerMetrics(CollectorRegistry())
    ages = {"SUCCEEDED": HOUR, "CANCELLED": 2 * HOUR, "FAILED": 3 * HOUR}
    # Per state: a minute short of its retention (kept), a minute past it (deleted).
    young = {s: await jobs_in(pool, s, 3, age - 60) for s, age in ages.items()}
    counts = {"SUCCEEDED": 4, "CANCELLED": 5, "FAILED": 6}
    old = {s: await jobs_in(pool, s, counts[s], age + 60) for s, age in ages.items()}
    for state in ages:
        assert pruned(metrics, state) == 0.0  # preset, before any prune
    deleted = await pruner(pool, metrics).run_once()
    assert deleted == {JobState.SUCCEEDED: 4, JobState.CANCELLED: 5, JobState.FAILED: 6}
    for state in ages:
        assert await left(pool, old[state]) == 0, state
        assert await left(pool, young[state]) == 3, state
    assert (pruned(metrics, "SUCCEEDED"), pruned(metrics, "CANCELLED")) == (4.0, 5.0)
    assert pruned(metrics, "FAILED") == 6.0
    # Nothing more is due: a second run deletes nothing and counts nothing.
    assert sum((await pruner(pool, metrics).run_once()).values()) == 0
    assert pruned(metrics, "FAILED") == 6.0


async def test_zero_keeps_a_state_forever(pool: asyncpg.Pool) -> None:
    succeeded = await jobs_in(pool, "SUCCEEDED", 3, 3650 * 24 * HOUR)
    failed = await jobs_in(pool, "FAILED", 3, 2.0)
    cancelled = await jobs_in(pool, "CANCELLED", 3, 3650 * 24 * HOUR)
    deleted = await pruner(pool, succeeded=0, failed=1.0, cancelled=0).run_once()
    assert deleted == {JobState.FAILED: 3}
    assert (await left(pool, succeeded), await left(pool, cancelled)) == (3, 3)
    assert await left(pool, failed) == 0
    keep_all = pruner(pool, succeeded=0, failed=0, cancelled=0)
    assert not keep_all.enabled
    assert await keep_all.run_once() == {}
    # Its loop ends at once instead of waking up for nothing.
    await asyncio.wait_for(keep_all.run(asyncio.Event(), lambda: True, 0.01), 1.0)
    with pytest.raises(ValueError, match="keeps jobs forever"):
        await retention.prune(pool, JobState.SUCCEEDED, 0, 10)


async def test_unfinished_jobs_are_never_deleted(pool: asyncpg.Pool) -> None:
    # Ten years old in every timestamp they have. (An unfinished job cannot have a
    # completed_at: the table's CHECK forbids it.)
    unfinished = [
        job_id
        for state in ("PENDING", "RUNNING", "RETRYING")
        for job_id in await jobs_in(pool, state, 5, 3650 * 24 * HOUR)
    ]
    finished = await jobs_in(pool, "SUCCEEDED", 5, 10.0)
    deleted = await pruner(pool, succeeded=1, cancelled=1, failed=1).run_once()
    assert sum(deleted.values()) == 5
    assert await left(pool, finished) == 0
    assert await left(pool, unfinished) == 15
    for state in (JobState.PENDING, JobState.RUNNING, JobState.RETRYING):
        with pytest.raises(ValueError, match="only finished jobs"):
            await retention.prune(pool, state, 1, 10)


async def test_a_batch_is_bounded_and_takes_the_oldest_first(pool: asyncpg.Pool) -> None:
    oldest = await jobs_in(pool, "SUCCEEDED", 100, 3 * HOUR)
    older = await jobs_in(pool, "SUCCEEDED", 150, 2 * HOUR)
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 100) == 100
    assert (await left(pool, oldest), await left(pool, older)) == (0, 150)
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 100) == 100
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 100) == 50


async def test_a_run_deletes_at_most_its_cap_and_the_loop_goes_on_at_once(
    pool: asyncpg.Pool,
) -> None:
    old = {s: await jobs_in(pool, s, 300, 4 * HOUR) for s in ("SUCCEEDED", "FAILED", "CANCELLED")}
    capped = pruner(pool, batch_size=40, max_per_run=250, pause_s=0.0)
    first = await capped.run_once()
    assert sum(first.values()) == 250
    assert capped.reached_cap(first)
    # The states take turns, a batch each: none is starved by another's backlog.
    assert sorted(first.values()) == [80, 80, 90]
    assert sum([await left(pool, job_ids) for job_ids in old.values()]) == 900 - 250
    # Its loop runs every second, and again at once after a run that reached its
    # cap: so the rest of the backlog (three more runs) goes right after the first.
    stop = asyncio.Event()
    loop = asyncio.create_task(capped.run(stop, lambda: True, 1.0))
    try:
        await until_left(pool, None, 900 - 250 - 1, 10)  # the first run, after 1 s
        await until_left(pool, None, 0, 0.9)  # 2 s if it waited between runs
    finally:
        stop.set()
        await loop


async def test_a_slow_batch_is_followed_by_a_pause_pace_times_as_long(
    pool: asyncpg.Pool, database: str
) -> None:
    await jobs_in(pool, "SUCCEEDED", 40, 4 * HOUR)
    # Every round trip takes 100 ms: so does every batch, and the three pauses
    # between the four batches 300 ms each (the floor, pause_s, is 0).
    proxy = Proxy.to(database)
    conn = await asyncpg.connect(proxy.url(database))
    try:
        proxy.latency(50)
        paced = pruner(conn, batch_size=10, max_per_run=40, pause_s=0.0, pace=3.0)
        started = time.monotonic()
        assert sum((await paced.run_once()).values()) == 40
        assert time.monotonic() - started >= 4 * 0.1 + 3 * 3 * 0.1
        assert paced.pause_after(0.1) == pytest.approx(0.3)
        assert pruner(conn, pause_s=0.05, pace=3.0).pause_after(0.001) == 0.05
    finally:
        await conn.close()
        proxy.stop()


async def test_a_batch_skips_rows_another_transaction_holds(
    pool: asyncpg.Pool, database: str
) -> None:
    old = await jobs_in(pool, "FAILED", 20, 4 * HOUR)
    held = old[0]
    other = await asyncpg.connect(database)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", held)
            # Deleted around it without waiting for it (a wait would hit the timeout).
            deleted = await asyncio.wait_for(retention.prune(pool, JobState.FAILED, HOUR, 100), 5.0)
            assert deleted == 19
            assert await left(pool, old) == 1
    finally:
        await other.close()
    assert await retention.prune(pool, JobState.FAILED, HOUR, 100) == 1


async def test_only_the_maintenance_leader_prunes(pool: asyncpg.Pool, database: str) -> None:
    leader, follower = Leadership(database), Leadership(database)
    try:
        assert await leader.held()
        assert not await follower.held()
        assert (leader.leading, follower.leading) == (True, False)
        old = await jobs_in(pool, "SUCCEEDED", 200, 2 * HOUR)
        metrics = {"leader": SchedulerMetrics(CollectorRegistry())}
        metrics["follower"] = SchedulerMetrics(CollectorRegistry())
        # Small runs, many of them: the follower gets as many chances as the leader.
        knobs = {"batch_size": 10, "max_per_run": 10, "pause_s": 0.01}
        stop = asyncio.Event()
        follower_loop = asyncio.create_task(
            pruner(pool, metrics["follower"], **knobs).run(stop, lambda: follower.leading, 0.01)
        )
        leader_loop = asyncio.create_task(
            pruner(pool, metrics["leader"], **knobs).run(stop, lambda: leader.leading, 0.01)
        )
        try:
            await until_left(pool, old, 0, 20)
            assert pruned(metrics["leader"], "SUCCEEDED") == 200.0
            assert pruned(metrics["follower"], "SUCCEEDED") == 0.0
            # The leader goes; the follower takes the lock and prunes from then on.
            await leader.release()
            assert await follower.held()
            more = await jobs_in(pool, "SUCCEEDED", 30, 2 * HOUR)
            await until_left(pool, more, 0, 20)
            assert pruned(metrics["follower"], "SUCCEEDED") == 30.0
        finally:
            stop.set()
            await asyncio.gather(follower_loop, leader_loop)
    finally:
        await leader.release()
        await follower.release()


async def test_an_idempotency_key_is_free_again_once_its_job_is_pruned(
    api: Api, pool: asyncpg.Pool
) -> None:
    body = {"type": "t", "idempotency_key": "order-42"}
    status, first, _ = await api.request("POST", "/api/v1/jobs", json=body)
    assert status == 201
    await pool.execute(
        "UPDATE jobs SET state = 'SUCCEEDED', attempt = 1, started_at = now() - interval '2 h',"
        " completed_at = now() - interval '2 h' WHERE id = $1",
        first["id"],
    )
    # Kept: the key still names the finished job.
    status, again, _ = await api.request("POST", "/api/v1/jobs", json=body)
    assert (status, again["id"]) == (200, first["id"])
    assert await pruner(pool).run_once() == {
        JobState.SUCCEEDED: 1,
        JobState.CANCELLED: 0,
        JobState.FAILED: 0,
    }
    status, fresh, _ = await api.request("POST", "/api/v1/jobs", json=body)
    assert status == 201
    assert fresh["id"] != first["id"]
    assert fresh["state"] == "PENDING"
    assert await db.get(pool, first["id"]) is None


async def _plan(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(row[0] for row in rows)


async def test_the_delete_walks_the_finished_index_and_the_claim_does_not(
    pool: asyncpg.Pool,
) -> None:
    await jobs_in(pool, "SUCCEEDED", 20_000, 2 * HOUR)
    await jobs_in(pool, "FAILED", 2_000, 2 * HOUR)
    await jobs_in(pool, "PENDING", 2_000, 60)
    # Each job's history, as the engine writes it: with job_events empty (and its
    # statistics saying so once autovacuum has analyzed it) a scan of it is the
    # cheapest plan, and the plan would not show what a real table gets.
    await pool.execute(
        "INSERT INTO job_events (job_id, from_state, to_state, attempt, actor, queue, type)"
        " SELECT id, NULL, state, attempt, 'test', queue, type FROM jobs"
    )
    # And edges, as a workflow's (the DELETE looks for a workflow job's edges both
    # ways: by the primary key and by the parent's index).
    await pool.execute(
        "INSERT INTO job_dependencies (job_id, parent_id)"
        " SELECT id, lag(id) OVER (ORDER BY id) FROM jobs OFFSET 1"
    )
    for table in ("jobs", "job_events", "job_dependencies"):
        await pool.execute(f"ANALYZE {table}")
    async with pool.acquire() as conn:
        # A generic plan too: asyncpg prepares the statement, and PostgreSQL may
        # switch to the generic plan after five runs. The state is a literal, so
        # the partial index applies to it as well.
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
                plan = await _plan(conn, retention.PRUNE[state], HOUR, 1000)
                # (An Index Scan, or a Bitmap Index Scan when the limit takes
                # most of what is due.)
                assert "Index Scan on jobs_finished_idx" in plan or (
                    "Index Scan using jobs_finished_idx" in plan
                ), plan
                # The rows deleted are found by primary key, not by a table scan.
                assert "Index Scan using jobs_pkey" in plan, plan
                assert "job_dependencies_pkey" in plan, plan
                assert "job_dependencies_parent_idx" in plan, plan
                assert "Seq Scan" not in plan, plan
            claim = await _plan(conn, db._CLAIM, None, ["t"], 100, "w", 30.0)
            assert "jobs_finished_idx" not in claim, claim
            assert "jobs_claim_idx" in claim, claim
        await conn.execute("RESET plan_cache_mode")


async def test_a_pruned_jobs_events_go_with_it(pool: asyncpg.Pool) -> None:
    old, _ = await db.insert(pool, NewJob(type="t"))
    kept, _ = await db.insert(pool, NewJob(type="t"))
    assert await db.cancel(pool, old.id) is not None
    assert await db.cancel(pool, kept.id) is not None
    await pool.execute(
        "UPDATE jobs SET completed_at = now() - interval '2 hours' WHERE id = $1", old.id
    )
    assert await retention.prune(pool, JobState.CANCELLED, HOUR, 10) == 1
    assert await events.for_job(pool, old.id) == []
    assert [e.to_state for e in await events.for_job(pool, kept.id)] == [
        JobState.PENDING,
        JobState.CANCELLED,
    ]


async def test_a_pruned_workflow_jobs_edges_go_with_it(pool: asyncpg.Pool) -> None:
    """Edges have no foreign key to cascade from (migration 0016): the pruner deletes
    a workflow job's edges, where it is the child and where it is the parent, with
    the job; the edges of jobs it keeps stay."""
    step = workflows.NewWorkflowJob
    async with pool.acquire() as conn:
        _, done = await workflows.create(
            conn,
            None,
            [
                step("a", NewJob(type="t")),
                step("b", NewJob(type="t"), ("a",)),
                step("c", NewJob(type="t"), ("b",)),
            ],
        )
        _, other = await workflows.create(
            conn, None, [step("d", NewJob(type="t")), step("e", NewJob(type="t"), ("d",))]
        )
    # b succeeded long ago, its parent a just now (for the test's sake); b's child
    # c still waits (b's success would have released it).
    for key, age_s in (("a", 0), ("b", 2 * HOUR)):
        await pool.execute(
            """
            UPDATE jobs SET state = 'SUCCEEDED', waiting_for = 0, attempt = 1,
                   started_at = now() - $2 * interval '1 second',
                   completed_at = now() - $2 * interval '1 second'
            WHERE id = $1
            """,
            done[key].id,
            age_s,
        )
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 10) == 1
    assert await left(pool, [done["a"].id, done["b"].id, done["c"].id]) == 2
    edges = await pool.fetch("SELECT job_id, parent_id FROM job_dependencies")
    assert [(r["job_id"], r["parent_id"]) for r in edges] == [(other["e"].id, other["d"].id)]


async def test_a_workflow_goes_with_its_last_job(pool: asyncpg.Pool) -> None:
    """``jobs.workflow_id`` has no foreign key (migration 0017): the statement that
    deletes a workflow's last job deletes its row too; a workflow with a job left
    (here one whose state is kept longer, or younger) stays, and so do the others."""
    step = workflows.NewWorkflowJob
    made: dict[str, dict[str, str]] = {}
    async with pool.acquire() as conn:
        for name, keys in (("whole", "ab"), ("split", "cd"), ("young", "ef"), ("old", "g")):
            workflow, by_key = await workflows.create(
                conn, name, [step(key, NewJob(type="t")) for key in keys]
            )
            made[name] = {"id": workflow.id, **{key: job.id for key, job in by_key.items()}}

    async def finish(key: str, state: str, age_s: float) -> None:
        workflow = next(w for w in made.values() if key in w)
        await pool.execute(
            """
            UPDATE jobs SET state = $2, attempt = 1, started_at = now() - $3 * interval '1 s',
                   completed_at = now() - $3 * interval '1 s'
            WHERE id = $1
            """,
            workflow[key],
            state,
            age_s,
        )

    for key in "abcg":
        await finish(key, "SUCCEEDED", 2 * HOUR)
    await finish("d", "FAILED", 2 * HOUR)  # FAILED is kept three hours here
    await finish("e", "SUCCEEDED", 2 * HOUR)
    await finish("f", "SUCCEEDED", 0)

    async def workflows_left() -> set[str]:
        rows = await pool.fetch("SELECT name FROM workflows")
        return {row["name"] for row in rows}

    # Oldest first: one batch holds a, b (the whole workflow) and c, the next g and e.
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 3) == 3
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 10) == 2
    assert await workflows_left() == {"split", "young"}
    async with pool.acquire() as conn:
        split = await workflows.get(conn, made["split"]["id"])
    assert split is not None
    assert [job.workflow_key for job in split.jobs] == ["d"]
    await finish("f", "SUCCEEDED", 2 * HOUR)
    assert await retention.prune(pool, JobState.SUCCEEDED, HOUR, 10) == 1
    assert await retention.prune(pool, JobState.FAILED, HOUR, 10) == 1
    assert await workflows_left() == set()
