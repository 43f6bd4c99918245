"""The worker's fence and its fault paths, under real network faults.

A fault proxy (tests/faults/proxy.py) stands between one worker and PostgreSQL
or NATS; the scheduler, the other processes and the test reach both directly.
The executions file (tests/e2e/executors.py) records when each attempt really
started and stopped, in every process, so the tests judge what ran, not what
the rows say.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import defaultdict
from typing import Any

import aiohttp
import asyncpg
import nats
import pytest
from orchestrix import broker, ids
from orchestrix.liveness import CUT_OFF_S
from orchestrix.settings import NatsSettings

from tests.e2e.conftest import Proxies, SystemFactory
from tests.e2e.harness import Service, System, read_executions, until
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.timeout(120)


async def insert_jobs(
    pool: asyncpg.Pool,
    count: int,
    job_type: str = "record",
    payload: dict[str, Any] | None = None,
    *,
    queue: str = "default",
    max_attempts: int = 3,
) -> list[str]:
    job_ids = [ids.new_id() for _ in range(count)]
    await pool.execute(
        "INSERT INTO jobs (id, type, payload, queue, max_attempts) "
        "SELECT unnest($1::text[]), $2, $3::jsonb, $4, $5",
        job_ids,
        job_type,
        payload or {},
        queue,
        max_attempts,
    )
    return job_ids


async def states(pool: asyncpg.Pool, job_ids: list[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM jobs WHERE id = ANY($1) GROUP BY state", job_ids
    )
    return {row["state"]: row["n"] for row in rows}


async def worker_id(pool: asyncpg.Pool, service: Service) -> str:
    found: str = await until(
        lambda: pool.fetchval("SELECT id FROM workers WHERE pid = $1", service.process.pid),
        20,
        f"{service.role} {service.process.pid} to register",
        service.log,
    )
    return found


async def start(system: System, role: str, **env: str) -> Service:
    service = system.start(role, **env)
    await system.ready(service)
    return service


async def exited(service: Service, timeout_s: float) -> int:
    """Wait for the process to exit without blocking the loop; its exit code."""
    await until(lambda: service.process.poll() is not None, timeout_s, "exit", service.log)
    code = service.process.poll()
    assert code is not None
    return code


async def succeeded_total(service: Service) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("orchestrix_jobs_succeeded_total{")
    )


def attempts_by_job(system: System) -> dict[str, list[dict[str, str]]]:
    """Every recorded execution, finished or stopped, per job in start order."""
    runs: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in read_executions(system.executions, stopped=True):
        runs[row["id"]].append(row)
    for rows in runs.values():
        rows.sort(key=lambda row: float(row["start"]))
    return runs


def overlaps(runs: dict[str, list[dict[str, str]]]) -> list[str]:
    """Jobs two of whose executions ran at the same time."""
    return [
        job_id
        for job_id, rows in runs.items()
        if any(float(a["end"]) > float(b["start"]) for a, b in itertools.pairwise(rows))
    ]


# --- PostgreSQL cut off: the fence ---------------------------------------------

LEASE_S = 6.0


async def test_a_worker_cut_off_from_postgresql_stops_its_jobs_before_they_run_elsewhere(
    make_system: SystemFactory, pool: asyncpg.Pool, proxy_to: Proxies
) -> None:
    system = make_system(
        LEASE_TIMEOUT=f"{LEASE_S:g}s",
        MAINTENANCE_INTERVAL="200ms",
        RETRY_BASE_DELAY="100ms",
        SHUTDOWN_TIMEOUT="1s",
    )
    pg = proxy_to(system.database_url)
    await start(system, "scheduler")
    # Five slots to spare, and a queue only it serves: it would claim more if it could.
    cut_off = await start(
        system,
        "worker",
        DATABASE_URL=pg.url(system.database_url),
        WORKER_CONCURRENCY="15",
        WORKER_QUEUES="default,stranded",
    )
    cut_off_id = await worker_id(pool, cut_off)
    job_ids = await insert_jobs(pool, 10, payload={"sleep_ms": 60_000})

    async def all_running_on_it() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'RUNNING' AND worker_id = $2",
            job_ids,
            cut_off_id,
        )
        return bool(n == 10)

    await until(all_running_on_it, 20, "the ten jobs to run on the first worker", cut_off.log)
    other = await start(system, "worker", WORKER_CONCURRENCY="10", WORKER_QUEUES="default")
    other_id = await worker_id(pool, other)

    cut_at = time.time()
    pg.cut()
    stranded = await insert_jobs(pool, 5, queue="stranded")

    async def all_restarted() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state = 'RUNNING' AND worker_id = $2",
            job_ids,
            other_id,
        )
        return bool(n == 10)

    await until(all_restarted, LEASE_S + 15, "the jobs to run again", other.log, every_s=0.2)
    # The cut-off worker claimed nothing while cut, though it had room and work.
    claimed = await pool.fetch(
        "SELECT id FROM jobs WHERE worker_id = $1 AND started_at > to_timestamp($2)",
        cut_off_id,
        cut_at,
    )
    assert claimed == []
    assert await states(pool, stranded) == {"PENDING": 5}

    # End the second runs, so that each has its interval in the file.
    other.signal(signal.SIGTERM)
    assert await exited(other, 20) == 0
    runs = attempts_by_job(system)
    for job_id in job_ids:
        first, second = (
            [r for r in runs[job_id] if r["pid"] == str(cut_off.process.pid)],
            [r for r in runs[job_id] if r["pid"] == str(other.process.pid)],
        )
        assert len(second) == 1
        # The fence returned it through the hand-back ledger: the attempt is not counted.
        assert second[0]["attempt"] == "1"
        # The first run ended: the fence stopped it; nothing else would have.
        assert len(first) == 1, f"the first run of {job_id} still ran when the second started"
        assert first[0]["how"] == "stopped"
        waited = float(second[0]["start"]) - cut_at
        assert waited < LEASE_S + 5, f"{job_id} ran again {waited:.1f} s after the cut"
    assert overlaps(runs) == []
    assert "lease not renewed in time; stopping the job" in cut_off.log()
    cut_off.process.kill()


# --- NATS cut off: no false fence, cancels by the lease renewal -----------------


async def answers_probe(system: System, worker: str) -> bool:
    """Whether the worker answers the lifeline's probe on NATS."""
    subject = broker.worker_subject(NatsSettings.from_env(system.env), worker)
    nc = await nats.connect(system.nats_url)
    try:
        await nc.request(subject, b"", timeout=1)
    except nats.errors.TimeoutError:
        return False
    finally:
        await nc.close()
    return True


async def test_a_worker_cut_off_from_nats_keeps_its_jobs_and_still_gets_cancels(
    make_system: SystemFactory, pool: asyncpg.Pool, proxy_to: Proxies
) -> None:
    system = make_system(LEASE_TIMEOUT="3s", MAINTENANCE_INTERVAL="200ms")
    bus = proxy_to(system.nats_url)
    api = await start(system, "api")
    scheduler = await start(system, "scheduler")
    worker = await start(system, "worker", NATS_URL=bus.url(system.nats_url))
    worker_key = await worker_id(pool, worker)
    job_ids = await insert_jobs(pool, 5, payload={"sleep_ms": 8000})
    doomed = (await insert_jobs(pool, 1, payload={"sleep_ms": 60_000}))[0]

    async def all_running() -> bool:
        return await states(pool, [*job_ids, doomed]) == {"RUNNING": 6}

    await until(all_running, 20, "the jobs to start", worker.log)
    assert await answers_probe(system, worker_key)
    bus.cut()
    # Longer than the cut-off (liveness.CUT_OFF_S): the fence must not mistake it.
    cut_at = time.monotonic()

    async def unanswered() -> bool:
        return not await answers_probe(system, worker_key)

    await until(unanswered, 10, "the probe to go unanswered")
    await until(lambda: time.monotonic() - cut_at > 2 * CUT_OFF_S, 10, "past the cut-off")
    cancelled_at = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.delete(f"http://127.0.0.1:{api.port}/api/v1/jobs/{doomed}") as response,
    ):
        assert response.status == 202
    # The cancel on NATS is lost; the next lease renewal (every second) brings it.
    await until(_in_state(pool, doomed, "CANCELLED"), 5, "the cancel to arrive", worker.log)
    assert time.monotonic() - cancelled_at < 3.0

    async def all_succeeded() -> bool:
        return await states(pool, job_ids) == {"SUCCEEDED": 5}

    await until(all_succeeded, 20, "the jobs to succeed", worker.log)
    rows = await pool.fetch("SELECT attempt, errors FROM jobs WHERE id = ANY($1)", job_ids)
    assert all(row["attempt"] == 1 and row["errors"] == [] for row in rows)
    done = read_executions(system.executions)
    assert sorted(r["id"] for r in done) == sorted(job_ids)
    assert "lease not renewed in time" not in worker.log()
    assert "job cancelled while running" in worker.log()
    assert "rescued" not in scheduler.log()
    # Healed, the worker hears NATS again (wake-ups, cancels, the lifeline's probe).
    bus.heal()
    await until(
        lambda: answers_probe(system, worker_key), 10, "the probe to be answered", worker.log
    )


def _in_state(pool: asyncpg.Pool, job_id: str, state: str) -> Any:
    async def check() -> bool:
        return await states(pool, [job_id]) == {state: 1}

    return check


# --- PostgreSQL slow -------------------------------------------------------------


async def test_a_slow_database_fences_nothing_and_every_job_succeeds_once(
    make_system: SystemFactory, pool: asyncpg.Pool, proxy_to: Proxies
) -> None:
    system = make_system(LEASE_TIMEOUT=f"{LEASE_S:g}s", MAINTENANCE_INTERVAL="200ms")
    pg = proxy_to(system.database_url)
    pg.latency(200)  # each way: every round trip of the worker takes 400 ms more
    scheduler = await start(system, "scheduler")
    worker = await start(
        system, "worker", DATABASE_URL=pg.url(system.database_url), WORKER_CONCURRENCY="20"
    )
    # Longer than a lease: each is renewed a few times through the slow link.
    job_ids = await insert_jobs(pool, 40, payload={"sleep_ms": 7000})

    async def all_succeeded() -> bool:
        return await states(pool, job_ids) == {"SUCCEEDED": 40}

    await until(all_succeeded, 60, "the jobs to succeed", worker.log, every_s=0.2)
    rows = await pool.fetch("SELECT attempt, errors FROM jobs WHERE id = ANY($1)", job_ids)
    assert all(row["attempt"] == 1 and row["errors"] == [] for row in rows)
    runs = attempts_by_job(system)
    assert sorted(runs) == sorted(job_ids)
    assert all(len(rows) == 1 and rows[0]["how"] == "done" for rows in runs.values())
    assert "lease not renewed in time" not in worker.log()
    assert "heartbeat failed" not in worker.log()
    assert "rescued" not in scheduler.log()


# --- No fault: renewals racing the batched success writes ------------------------


async def test_renewals_racing_success_writes_abandon_nothing_and_count_each_success_once(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    # The shortest lease: a renewal at every beat, while successes of jobs of
    # different lengths are written in batches all the time. A renewal whose
    # snapshot holds a job whose success commits first finds it no longer
    # RUNNING: that is no lost lease, and the success counts once.
    system = make_system(LEASE_TIMEOUT="2s", WORKER_CONCURRENCY="200")
    worker = await start(system, "worker")
    job_ids = [
        job_id
        for sleep_ms in range(0, 500, 50)
        for job_id in await insert_jobs(pool, 300, payload={"sleep_ms": sleep_ms})
    ]

    async def all_succeeded() -> bool:
        return await states(pool, job_ids) == {"SUCCEEDED": 3000}

    await until(all_succeeded, 90, "3,000 jobs to succeed", worker.log, every_s=0.2)
    assert await succeeded_total(worker) == 3000
    log = worker.log()
    assert "lease lost; attempt abandoned" not in log
    assert "lease not renewed in time" not in log
    runs = attempts_by_job(system)
    assert len(runs) == 3000
    assert all(len(rows) == 1 and rows[0]["how"] == "done" for rows in runs.values())


async def test_the_shortest_lease_fences_no_job_that_its_worker_renews(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    # LEASE_TIMEOUT's lowest value; jobs of more than two leases.
    system = make_system(LEASE_TIMEOUT="2s", MAINTENANCE_INTERVAL="200ms")
    scheduler = await start(system, "scheduler")
    worker = await start(system, "worker")
    job_ids = await insert_jobs(pool, 3, payload={"sleep_ms": 5000})

    async def all_succeeded() -> bool:
        return await states(pool, job_ids) == {"SUCCEEDED": 3}

    await until(all_succeeded, 20, "the jobs to succeed", worker.log)
    rows = await pool.fetch("SELECT attempt FROM jobs WHERE id = ANY($1)", job_ids)
    assert [row["attempt"] for row in rows] == [1, 1, 1]
    assert "lease not renewed in time" not in worker.log()
    assert "rescued" not in scheduler.log()


# --- A worker stopping while PostgreSQL is away ------------------------------------

# A shutdown marks nothing FAILED and uses no attempt: with one attempt each, a
# counted attempt would end these jobs FAILED.


async def stopped_while_the_database_is_away(
    system: System, pool: asyncpg.Pool, pg: Proxy, *, back_after_s: float | None
) -> tuple[Service, list[str]]:
    """Jobs of a minute, running on a worker whose database then goes away; SIGTERM;
    PostgreSQL back ``back_after_s`` later (None: once the worker has exited)."""
    worker = await start(system, "worker", DATABASE_URL=pg.url(system.database_url))
    job_ids = await insert_jobs(pool, 3, payload={"sleep_ms": 60_000}, max_attempts=1)

    async def all_running() -> bool:
        return await states(pool, job_ids) == {"RUNNING": 3}

    await until(all_running, 20, "the jobs to start", worker.log)
    pg.close()
    worker.signal(signal.SIGTERM)
    if back_after_s is not None:
        deadline = time.monotonic() + back_after_s
        await until(lambda: time.monotonic() >= deadline, back_after_s + 1, "the outage to end")
        pg.heal()
    assert await exited(worker, 30) == 0
    pg.heal()
    return worker, job_ids


async def assert_handed_back(pool: asyncpg.Pool, job_ids: list[str]) -> None:
    rows = await pool.fetch(
        "SELECT state, attempt, handoffs, errors FROM jobs WHERE id = ANY($1)", job_ids
    )
    assert [(r["state"], r["attempt"], r["errors"]) for r in rows] == [("PENDING", 0, [])] * 3
    assert [r["handoffs"] for r in rows] == [1] * 3


async def test_a_worker_stopping_while_postgresql_is_briefly_away_hands_its_jobs_back(
    make_system: SystemFactory, pool: asyncpg.Pool, proxy_to: Proxies
) -> None:
    system = make_system(SHUTDOWN_TIMEOUT="1s", MAINTENANCE_INTERVAL="200ms")
    pg = proxy_to(system.database_url)
    scheduler = await start(system, "scheduler")
    worker, job_ids = await stopped_while_the_database_is_away(system, pool, pg, back_after_s=3)
    assert "job handed back unfinished" in worker.log()
    # Nothing is left for the lifeline or the rescuer to count.
    await until(lambda: "worker stopped" in worker.log(), 5, "the worker to stop")
    await assert_handed_back(pool, job_ids)
    assert "rescued" not in scheduler.log()


async def test_a_worker_stopping_while_postgresql_stays_away_uses_no_attempt(
    make_system: SystemFactory, pool: asyncpg.Pool, proxy_to: Proxies
) -> None:
    system = make_system(SHUTDOWN_TIMEOUT="1s", MAINTENANCE_INTERVAL="200ms")
    pg = proxy_to(system.database_url)
    await start(system, "scheduler")
    _, job_ids = await stopped_while_the_database_is_away(system, pool, pg, back_after_s=None)

    async def settled() -> bool:
        return "RUNNING" not in await states(pool, job_ids)

    # The worker is gone: within seconds its jobs are somebody's decision.
    await until(settled, 20, "the jobs to leave RUNNING")
    await assert_handed_back(pool, job_ids)
