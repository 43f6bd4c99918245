"""A worker whose executor threads are all stuck takes no work until one returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
from orchestrix import ids

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import read_executions, until

pytestmark = pytest.mark.timeout(120)


async def insert(pool: asyncpg.Pool, job_type: str, payload: dict[str, str]) -> str:
    """A job with a 1 s timeout and a single attempt."""
    job_id = ids.new_id()
    await pool.execute(
        "INSERT INTO jobs (id, type, payload, timeout_seconds, max_attempts)"
        " VALUES ($1, $2, $3, 1, 1)",
        job_id,
        job_type,
        payload,
    )
    return job_id


async def test_a_job_waits_for_a_stuck_thread_instead_of_timing_out(
    make_system: SystemFactory, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    system = make_system(WORKER_CONCURRENCY="1")
    scheduler = system.start("scheduler")
    worker = system.start("worker")
    await system.ready(scheduler)
    await system.ready(worker)
    logs = lambda: worker.log()[-3000:]  # noqa: E731
    release = tmp_path / "release"
    try:
        stuck = await insert(pool, "stuck_sync", {"release": str(release)})
        await until(lambda: _is(pool, stuck, "FAILED"), 20, "the stuck job to time out", logs)
        # Its function still runs, ignoring its cancel flag: the one slot is taken.
        waiting = await insert(pool, "record_sync", {})
        deadline = time.monotonic() + 3  # three times the waiting job's timeout
        while time.monotonic() < deadline:
            row = await pool.fetchrow("SELECT state, last_error FROM jobs WHERE id = $1", waiting)
            assert row["state"] not in ("RUNNING", "SUCCEEDED", "FAILED"), dict(row)
            await asyncio.sleep(0.1)
    finally:
        release.touch()
    await until(lambda: _is(pool, waiting, "SUCCEEDED"), 20, "the waiting job to run", logs)
    assert [r["id"] for r in read_executions(system.executions)] == [waiting]
    error = await pool.fetchval("SELECT last_error FROM jobs WHERE id = $1", stuck)
    assert error == "JobTimeout: the attempt ran longer than 1 s"


async def _is(pool: asyncpg.Pool, job_id: str, state: str) -> bool:
    return bool(await pool.fetchval("SELECT state = $2 FROM jobs WHERE id = $1", job_id, state))
