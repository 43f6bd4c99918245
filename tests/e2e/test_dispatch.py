"""Dispatch with real processes: a worker takes only the queues it serves and the
types it has executors for; the rest wait for a worker that can run them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import pytest
from orchestrix import ids

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import read_executions, until

pytestmark = pytest.mark.timeout(90)


async def insert(
    pool: asyncpg.Pool,
    count: int,
    job_type: str,
    queue: str = "default",
    payload: dict[str, Any] | None = None,
) -> list[str]:
    job_ids = [ids.new_id() for _ in range(count)]
    await pool.execute(
        "INSERT INTO jobs (id, type, queue, max_attempts, payload)"
        " SELECT unnest($1::text[]), $2, $3, 1, $4::jsonb",
        job_ids,
        job_type,
        queue,
        payload or {},
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


async def test_a_pause_holds_fleet_wide_within_a_second_and_a_resume_starts_at_once(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(WORKER_CONCURRENCY="10")
    api = system.start("api")
    scheduler = system.start("scheduler")
    workers = [system.start("worker") for _ in range(2)]
    for service in (api, scheduler, *workers):
        await system.ready(service)
    job_ids = await insert(pool, 400, "record", "mail", {"sleep_ms": 100})
    other_ids = await insert(pool, 40, "record", "reports", {"sleep_ms": 100})
    base = f"http://127.0.0.1:{api.port}/api/v1/queues/mail"

    async def some_ran() -> bool:
        return len(read_executions(system.executions)) >= 20

    async with aiohttp.ClientSession() as http:
        await until(some_ran, 20, "the first jobs to run")
        async with http.post(f"{base}/pause") as response:
            assert response.status == 200, await response.text()
        paused = time.time()
        await asyncio.sleep(2)
        # Another queue is not held by it.
        assert await states(pool, other_ids) == {"SUCCEEDED": 40}
        waiting = await states(pool, job_ids)
        assert waiting["PENDING"] > 100, waiting
        async with http.get(base) as response:
            assert (await response.json())["paused"]
        resumed = time.time()  # before: jobs start before the answer arrives
        async with http.post(f"{base}/resume") as response:
            assert response.status == 200, await response.text()

        async def all_done() -> bool:
            return await states(pool, job_ids) == {"SUCCEEDED": 400}

        await until(all_done, 40, "the queue to drain once resumed")
    ours = set(job_ids)
    mail = [row for row in read_executions(system.executions, stopped=True) if row["id"] in ours]
    # What was running when the pause came finished; nothing started a second after it
    # until the resume, and the resume did not wait for the poll.
    assert all(row["how"] == "done" for row in mail)
    held = [row for row in mail if paused + 1 < float(row["start"]) < resumed]
    assert held == []
    first_after = min(float(row["start"]) for row in mail if float(row["start"]) >= resumed)
    assert first_after - resumed < 1.0
