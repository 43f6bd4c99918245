"""Crash recovery with real processes: a killed worker, a lost claim answer, a running cancel,
a worker cut off from PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from orchestrix import ids

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import read_executions, until
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.timeout(120)
FAST = {
    "LEASE_TIMEOUT": "2s",
    "MAINTENANCE_INTERVAL": "200ms",
    "RETRY_BASE_DELAY": "100ms",
}


async def state_of(pool: asyncpg.Pool, job_id: str) -> str:
    state: str = await pool.fetchval("SELECT state FROM jobs WHERE id = $1", job_id)
    return state


async def test_a_killed_workers_job_runs_again_within_seconds_not_a_lease(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    # The default 30 s lease: only the lifeline can bring the job back this fast.
    system = make_system(MAINTENANCE_INTERVAL="200ms", RETRY_BASE_DELAY="100ms")
    scheduler = system.start("scheduler")
    victim = system.start("worker")
    await system.ready(scheduler)
    await system.ready(victim)
    job_id = ids.new_id()
    await pool.execute(
        "INSERT INTO jobs (id, type, payload) VALUES ($1, 'record', $2)", job_id, {"sleep_ms": 4000}
    )
    await until(lambda: _is(pool, job_id, "RUNNING"), 20, "the job to start")
    survivor = system.start("worker")
    await system.ready(survivor)
    killed_at = await pool.fetchval("SELECT now()")
    victim.process.send_signal(signal.SIGKILL)
    victim.wait(5)

    async def restarted() -> bool:
        attempt = await pool.fetchval("SELECT attempt FROM jobs WHERE id = $1", job_id)
        return bool(attempt == 2)

    await until(restarted, 20, "the job to run again", lambda: scheduler.log()[-3000:])
    waited = await pool.fetchval(
        "SELECT extract(epoch FROM started_at - $2::timestamptz) FROM jobs WHERE id = $1",
        job_id,
        killed_at,
    )
    assert waited < 5.0, f"the job ran again {waited:.1f} s after its worker was killed"
    await until(lambda: _is(pool, job_id, "SUCCEEDED"), 20, "the rescued job to succeed")
    job = await pool.fetchrow("SELECT attempt, errors, last_error FROM jobs WHERE id = $1", job_id)
    assert job["attempt"] == 2
    assert job["errors"][0]["attempt"] == 1
    assert job["errors"][0]["error"].startswith("WorkerLost")
    assert "worker died; job rescued" in scheduler.log()
    finished = [r for r in read_executions(system.executions) if r["id"] == job_id]
    assert [(r["attempt"], r["pid"]) for r in finished] == [("2", str(survivor.process.pid))]


async def _is(pool: asyncpg.Pool, job_id: str, state: str) -> bool:
    return await state_of(pool, job_id) == state


def _in(pool: asyncpg.Pool, job_id: str, state: str) -> Callable[[], Awaitable[bool]]:
    """A check for ``until``, bound to this job now (not to a loop variable)."""
    return lambda: _is(pool, job_id, state)


async def test_a_claim_whose_answer_was_lost_is_handed_back_and_run(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    # A lease of 3 s: the heartbeat renews (and looks for orphans) every second.
    system = make_system(LEASE_TIMEOUT="3s")
    worker = system.start("worker")
    await system.ready(worker)
    # /ready answers before the worker has registered: wait for its row.
    worker_id = await until(
        lambda: pool.fetchval("SELECT id FROM workers WHERE pid = $1", worker.process.pid),
        20,
        "the worker to register",
        worker.log,
    )
    # As if this worker's claim had committed but its answer never arrived: the
    # job is RUNNING for it, claimed a while ago, leased for an hour.
    job_id = ids.new_id()
    await pool.execute(
        "INSERT INTO jobs (id, type, state, attempt, worker_id, started_at, lease_expires_at) "
        "VALUES ($1, 'record', 'RUNNING', 1, $2, now() - interval '1 minute', "
        "now() + interval '1 hour')",
        job_id,
        worker_id,
    )
    await until(lambda: _is(pool, job_id, "SUCCEEDED"), 30, "the orphaned job to run", worker.log)
    assert "orphaned claim handed back" in worker.log()
    runs = [r for r in read_executions(system.executions) if r["id"] == job_id]
    assert [r["attempt"] for r in runs] == ["1"]  # handed back uncounted, run once


async def test_maintenance_moves_to_another_scheduler_when_the_leader_dies(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(**FAST)
    first = system.start("scheduler")
    await system.ready(first)
    await until(lambda: "now runs maintenance" in first.log(), 10, "the first to lead")
    second = system.start("scheduler")
    await system.ready(second)
    first.process.send_signal(signal.SIGKILL)
    first.wait(5)
    await until(
        lambda: "now runs maintenance" in second.log(), 15, "the second to lead", second.log
    )


async def test_cancelling_a_running_job_stops_it(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(**FAST)
    api, scheduler, worker = (system.start(role) for role in ("api", "scheduler", "worker"))
    for service in (api, scheduler, worker):
        await system.ready(service)
    url = f"http://127.0.0.1:{api.port}/api/v1/jobs"
    async with aiohttp.ClientSession() as http:
        for job_type in ("record", "record_sync"):  # on the loop, and in a thread
            async with http.post(
                url, json={"type": job_type, "payload": {"sleep_ms": 30_000}}
            ) as response:
                job_id = (await response.json())["id"]
            await until(_in(pool, job_id, "RUNNING"), 20, "the job to start")
            async with http.delete(f"{url}/{job_id}") as response:
                assert response.status == 202
            await until(
                _in(pool, job_id, "CANCELLED"),
                10,
                "the job to be cancelled",
                worker.log,
            )
            assert "job cancelled while running" in worker.log()
    # Neither attempt ran to its end.
    assert read_executions(system.executions) == []


async def test_a_worker_cut_off_from_postgresql_works_again_once_it_is_back(
    make_system: SystemFactory, pool: asyncpg.Pool, database: str
) -> None:
    # The worker reaches PostgreSQL through a proxy that the test cuts (silence,
    # no error) while the worker holds a full batch, for long enough that the
    # fence stops those jobs and frees their slots.
    target = urlsplit(database)
    assert target.port is not None
    proxy = Proxy(target.hostname or "127.0.0.1", target.port)
    proxy.start()
    system = make_system(**FAST, WORKER_CONCURRENCY="4", SHUTDOWN_TIMEOUT="1s")
    scheduler = system.start("scheduler")
    worker = system.start("worker", DATABASE_URL=proxy.url(database))
    try:
        await system.ready(scheduler)
        await system.ready(worker)
        job_ids = [ids.new_id() for _ in range(8)]
        await pool.execute(
            "INSERT INTO jobs (id, type, payload) "
            "SELECT id, 'record', $2 FROM unnest($1::text[]) AS id",
            job_ids,
            {"sleep_ms": 5000},
        )

        async def running() -> int:
            n: int = await pool.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'RUNNING'", job_ids
            )
            return n

        await until(lambda: _n(running(), 4), 20, "a full batch to start")
        proxy.cut()
        await until(
            lambda: "lease not renewed in time" in worker.log(), 10, "the fence to stop them"
        )
        await asyncio.sleep(1.0)  # the fenced jobs' slots are free, PostgreSQL still away
        proxy.heal()
        # Back in touch: it answers /ready and claims again (the other four jobs,
        # and the four the rescuer took back).
        await system.ready(worker, 10)
        await until(lambda: _n(running(), 4), 15, "the worker to claim again", worker.log)
    finally:
        system.stop_all()
        proxy.stop()


async def _n(count: Awaitable[int], wanted: int) -> bool:
    return await count >= wanted
