"""On demand (`make test-slow`): a longer run of the whole pipeline under a mixed load."""

from __future__ import annotations

import random
import time
from collections import Counter

import asyncpg
import pytest
from orchestrix import ids

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import read_executions, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
JOBS = 50_000


async def test_soak_mixed_jobs_through_two_schedulers_and_four_workers(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    """Every job ends in the state its payload asks for, and no attempt runs twice."""
    system = make_system(WORKER_CONCURRENCY="25", RETRY_BASE_DELAY="50ms", RETRY_MAX_DELAY="1s")
    services = [system.start("scheduler") for _ in range(2)]
    services += [system.start("worker") for _ in range(4)]
    for service in services:
        await system.ready(service)

    rng = random.Random(7)
    kinds = rng.choices(["ok", "demo_ok", "fail"], weights=[90, 5, 5], k=JOBS)
    job_ids = [ids.new_id() for _ in range(JOBS)]
    types = ["record" if kind == "ok" else "demo_job" for kind in kinds]
    payloads = [
        {"sleep_ms": rng.randint(0, 20)}
        if kind == "ok"
        else {"fail": "retryable"}
        if kind == "fail"
        else {}
        for kind in kinds
    ]
    started = time.monotonic()
    await pool.execute(
        "INSERT INTO jobs (id, type, payload, max_attempts) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int[])",
        job_ids,
        types,
        payloads,
        [2] * JOBS,
    )

    async def settled() -> bool:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"
        )
        return bool(waiting == 0)

    await until(settled, 800, f"{JOBS} jobs to settle", every_s=1.0)
    elapsed = time.monotonic() - started
    rows = await pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    by_state = {row["state"]: row["n"] for row in rows}
    expected_failed = kinds.count("fail")
    assert by_state == {"SUCCEEDED": JOBS - expected_failed, "FAILED": expected_failed}
    attempts = Counter((row["id"], row["attempt"]) for row in read_executions(system.executions))
    assert max(attempts.values()) == 1
    assert len(attempts) == kinds.count("ok")
    print(f"\nsoak: {JOBS} jobs settled in {elapsed:.1f}s ({JOBS / elapsed:.0f} jobs/s)")
