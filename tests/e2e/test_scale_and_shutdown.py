"""Several schedulers and workers at once; a worker stopped in the middle of long jobs."""

from __future__ import annotations

import signal
import time
from collections import Counter

import asyncpg
import pytest
from orchestrix import ids

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import read_executions, until

pytestmark = pytest.mark.timeout(240)


async def insert_jobs(
    pool: asyncpg.Pool, count: int, job_type: str, payload: dict[str, int] | None = None
) -> list[str]:
    job_ids = [ids.new_id() for _ in range(count)]
    await pool.execute(
        "INSERT INTO jobs (id, type, payload) SELECT unnest($1::text[]), $2, $3::jsonb",
        job_ids,
        job_type,
        payload or {},
    )
    return job_ids


async def states(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    return {row["state"]: row["n"] for row in rows}


async def test_three_schedulers_three_workers_run_each_job_exactly_once(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(WORKER_CONCURRENCY="20")
    services = [system.start("scheduler") for _ in range(3)]
    services += [system.start("worker") for _ in range(3)]
    for service in services:
        await system.ready(service)

    started = time.monotonic()
    job_ids = await insert_jobs(pool, 5000, "record")

    async def all_succeeded() -> bool:
        return (await states(pool)).get("SUCCEEDED", 0) == 5000

    await until(
        all_succeeded,
        180,
        "5,000 jobs to succeed",
        lambda: f"{states}" + "\n".join(s.log()[-2000:] for s in services),
        every_s=0.2,
    )
    elapsed = time.monotonic() - started

    runs = read_executions(system.executions)
    per_job = Counter(row["id"] for row in runs)
    assert set(per_job) == set(job_ids)
    assert max(per_job.values()) == 1, "a job ran more than once"
    assert await states(pool) == {"SUCCEEDED": 5000}
    # The work was shared: every worker process ran some of it.
    assert len({row["pid"] for row in runs}) == 3
    print(
        f"\n5,000 jobs through 3 schedulers and 3 workers in {elapsed:.1f}s "
        f"({5000 / elapsed:.0f} jobs/s)"
    )


async def test_sigterm_mid_job_hands_back_and_every_job_still_succeeds(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    # Jobs of 3 s, a grace period of 1 s: the stopping worker cannot finish them.
    system = make_system(WORKER_CONCURRENCY="5", SHUTDOWN_TIMEOUT="1s")
    scheduler = system.start("scheduler")
    doomed = system.start("worker")
    await system.ready(scheduler)
    await system.ready(doomed)
    job_ids = await insert_jobs(pool, 5, "record", {"sleep_ms": 3000})

    async def all_running() -> bool:
        return (await states(pool)).get("RUNNING", 0) == 5

    await until(all_running, 20, "the worker to start all five jobs")
    doomed.signal(signal.SIGTERM)
    assert doomed.wait(15) == 0
    log = doomed.log()
    assert "grace period over; handing back" in log
    assert (await states(pool)) == {"PENDING": 5}

    # Another worker claims the returned jobs and finishes every one.
    rescuer = system.start("worker")
    await system.ready(rescuer)

    async def all_succeeded() -> bool:
        return (await states(pool)) == {"SUCCEEDED": 5}

    await until(all_succeeded, 30, "the handed-back jobs to succeed", rescuer.log)
    rows = await pool.fetch(
        "SELECT attempt, errors, handoffs FROM jobs WHERE id = ANY($1)", job_ids
    )
    # A hand-back is not a failed attempt, but it is counted.
    assert all(row["attempt"] == 1 and row["errors"] == [] for row in rows)
    assert [row["handoffs"] for row in rows] == [1] * 5
    finished = [
        r for r in read_executions(system.executions) if r["pid"] == str(rescuer.process.pid)
    ]
    assert sorted(r["id"] for r in finished) == sorted(job_ids)


async def test_sigterm_lets_running_jobs_finish_within_the_grace_period(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(WORKER_CONCURRENCY="5", SHUTDOWN_TIMEOUT="20s")
    scheduler = system.start("scheduler")
    worker = system.start("worker")
    await system.ready(scheduler)
    await system.ready(worker)
    await insert_jobs(pool, 5, "record", {"sleep_ms": 1500})

    async def all_running() -> bool:
        return (await states(pool)).get("RUNNING", 0) == 5

    await until(all_running, 20, "the worker to start all five jobs")
    worker.signal(signal.SIGTERM)
    assert worker.wait(25) == 0
    # The same worker finished them all before it exited; nothing failed.
    assert await states(pool) == {"SUCCEEDED": 5}
    runs = read_executions(system.executions)
    assert {r["pid"] for r in runs} == {str(worker.process.pid)}
    assert "handing back" not in worker.log()
