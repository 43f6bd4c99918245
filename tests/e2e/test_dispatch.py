"""Dispatch with real processes: a worker takes only the queues it serves and the
types it has executors for; the rest wait for a worker that can run them."""

from __future__ import annotations

from collections import Counter

import asyncpg
import pytest
from orchestrix import ids

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import read_executions, until

pytestmark = pytest.mark.timeout(90)


async def insert(
    pool: asyncpg.Pool, count: int, job_type: str, queue: str = "default"
) -> list[str]:
    job_ids = [ids.new_id() for _ in range(count)]
    await pool.execute(
        "INSERT INTO jobs (id, type, queue, max_attempts) SELECT unnest($1::text[]), $2, $3, 1",
        job_ids,
        job_type,
        queue,
    )
    return job_ids


async def states(pool: asyncpg.Pool, job_ids: list[str]) -> Counter[str]:
    rows = await pool.fetch("SELECT state FROM jobs WHERE id = ANY($1::text[])", job_ids)
    return Counter(row["state"] for row in rows)


async def test_a_worker_without_the_executor_leaves_the_jobs_to_one_with_it(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    # A rolling deploy that adds the type `record`: one old worker lacks it.
    system = make_system(WORKER_CONCURRENCY="10")
    scheduler = system.start("scheduler")
    old = system.start("worker", ORCHESTRIX_EXECUTORS="")
    await system.ready(scheduler)
    await system.ready(old)
    job_ids = await insert(pool, 150, "record")
    await insert(pool, 20, "noop")  # the old worker has work of its own
    # The new type waits for a worker that can run it: none fails with NoExecutor.
    await until(lambda: _noop_done(pool), 20, "the old worker to run its own jobs", old.log)
    assert await states(pool, job_ids) == {"PENDING": 150}
    new = [system.start("worker") for _ in range(2)]
    for worker in new:
        await system.ready(worker)

    async def all_done() -> bool:
        return await states(pool, job_ids) == {"SUCCEEDED": 150}

    await until(all_done, 40, "the new workers to run every record job")
    pids = {row["pid"] for row in read_executions(system.executions)}
    assert str(old.process.pid) not in pids
    assert pids <= {str(worker.process.pid) for worker in new}


async def _noop_done(pool: asyncpg.Pool) -> bool:
    left = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE type = 'noop' AND state <> 'SUCCEEDED'"
    )
    return bool(left == 0)


async def test_a_worker_takes_only_its_queues(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(WORKER_CONCURRENCY="10")
    scheduler = system.start("scheduler")
    emails = system.start("worker", WORKER_QUEUES="emails")
    everything = system.start("worker")
    for service in (scheduler, emails, everything):
        await system.ready(service)
    email_jobs = await insert(pool, 40, "record", "emails")
    report_jobs = await insert(pool, 40, "record", "reports")

    async def all_done() -> bool:
        done = await states(pool, email_jobs + report_jobs)
        return done == {"SUCCEEDED": 80}

    await until(all_done, 40, "every job to succeed")
    ran = {row["id"]: row["pid"] for row in read_executions(system.executions)}
    assert {ran[job_id] for job_id in report_jobs} == {str(everything.process.pid)}
