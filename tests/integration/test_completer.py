"""The completer's failure writes on a real database: error texts PostgreSQL would
refuse, and cancellations asked for while the attempt ran."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from orchestrix import migrate
from orchestrix.db import jobs as db
from orchestrix.db.pool import init_connection
from orchestrix.devstack import database_url
from orchestrix.errors import MAX_ERROR_CHARS, UNSTORABLE_ERROR, Kind
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job, NewJob
from orchestrix.services.worker.completer import Completer
from orchestrix.services.worker.runner import Failure
from orchestrix.settings import RetrySettings
from orchestrix.states import JobState

from tests.conftest import RUN_ID, Servers

# Retries due at once: a job left RETRYING is claimable straight away.
SETTINGS = RetrySettings(base_delay_s=0.001, max_delay_s=0.001)


async def running(pool: asyncpg.Pool, max_attempts: int = 3) -> Job:
    """A job moved to RUNNING (attempt 1) the way a worker claims it."""
    new, _ = await db.insert(pool, NewJob(type="t", max_attempts=max_attempts))
    (job,) = await claim(pool)
    assert (job.id, job.attempt) == (new.id, 1)
    return job


async def claim(pool: asyncpg.Pool) -> list[Job]:
    return await db.claim(pool, worker_id="test", queues=None, types=["t"], limit=10, lease_s=30)


def count(metrics: WorkerMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"type": "t", "queue": "default"})
    return value or 0.0


async def stored(pool: asyncpg.Pool, job_id: str) -> Job:
    job = await db.get(pool, job_id)
    assert job is not None
    return job


@pytest.mark.parametrize(
    ("kind", "state"), [(Kind.RETRYABLE, JobState.RETRYING), (Kind.PERMANENT, JobState.FAILED)]
)
async def test_an_error_with_u0000_is_stored_with_it_replaced(
    pool: asyncpg.Pool, kind: Kind, state: JobState
) -> None:
    job = await running(pool)
    completer = Completer(pool, SETTINGS, WorkerMetrics(1))
    assert await completer.record(job, Failure("ValueError: bad \x00 byte", kind))
    after = await stored(pool, job.id)
    assert after.state is state
    assert after.last_error == "ValueError: bad \ufffd byte"
    assert [e["error"] for e in after.errors] == ["ValueError: bad \ufffd byte"]


async def test_a_5_mb_error_is_stored_cut_to_the_limit(pool: asyncpg.Pool) -> None:
    job = await running(pool, max_attempts=1)
    huge = "RuntimeError: " + "x" * 5_000_000
    completer = Completer(pool, SETTINGS, WorkerMetrics(1))
    assert await completer.record(job, Failure(huge, Kind.RETRYABLE))
    after = await stored(pool, job.id)
    assert after.state is JobState.FAILED  # the last attempt
    assert after.last_error is not None
    assert len(after.last_error) == MAX_ERROR_CHARS
    assert after.last_error.startswith("RuntimeError: xxx")
    cut = len(huge) - after.last_error.index("…")
    assert after.last_error.endswith(f"… [{cut} of {len(huge)} characters cut]")
    assert [e["error"] for e in after.errors] == [after.last_error]


@pytest.fixture
async def latin1_pool(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database whose encoding has no room for most of Unicode."""
    name = f"orx_test_{RUN_ID}_latin1"
    admin = await asyncpg.connect(servers.admin_url)
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
        url = database_url(servers.admin_url, name)
        migrate.up(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2, init=init_connection)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_an_error_postgres_still_refuses_is_recorded_as_unstorable(
    latin1_pool: asyncpg.Pool,
) -> None:
    job = await running(latin1_pool)
    completer = Completer(latin1_pool, SETTINGS, WorkerMetrics(1))
    assert await completer.record(job, Failure("ValueError: 日本語", Kind.RETRYABLE))
    after = await stored(latin1_pool, job.id)
    assert after.state is JobState.RETRYING  # the attempt counts, and the next one comes
    assert after.last_error == UNSTORABLE_ERROR
    assert [e["error"] for e in after.errors] == [UNSTORABLE_ERROR]


async def test_a_retryable_failure_of_a_job_asked_to_cancel_ends_it_cancelled(
    pool: asyncpg.Pool,
) -> None:
    job, doomed = await running(pool), await running(pool)
    for asked in (job, doomed):
        assert await db.request_cancel(pool, asked.id) is not None  # DELETE answered 202
    metrics = WorkerMetrics(1)
    metrics.preset(["t"], ["default"])  # what a worker with an executor for "t" knows
    completer = Completer(pool, SETTINGS, metrics)
    assert await completer.record(job, Failure("ValueError: interrupted", Kind.RETRYABLE))
    after = await stored(pool, job.id)
    assert after.state is JobState.CANCELLED
    assert after.completed_at is not None
    assert after.last_error == "ValueError: interrupted"
    assert [e["attempt"] for e in after.errors] == [1]
    assert await claim(pool) == []  # no further attempt
    assert count(metrics, "orchestrix_jobs_cancelled_while_running_total") == 1
    assert count(metrics, "orchestrix_jobs_retried_total") == 0
    # A failure for good stands: it is what the attempt came to.
    assert await completer.record(doomed, Failure("InvalidPayload: no", Kind.PERMANENT))
    assert (await stored(pool, doomed.id)).state is JobState.FAILED
    assert count(metrics, "orchestrix_jobs_failed_total") == 1
