"""POST /api/v1/jobs/{id}/retry and /run over real HTTP, on a real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from orchestrix import ids
from orchestrix.db import jobs as db
from orchestrix.models import NewJob
from orchestrix.settings import Settings

from tests.conftest import Api


async def failed_job(pool: asyncpg.Pool) -> str:
    job, _ = await db.insert(pool, NewJob(type="t", max_attempts=1))
    (claimed,) = await db.claim(pool, worker_id="w", queues=None, types=["t"], limit=1, lease_s=30)
    assert await db.fail(pool, claimed.id, claimed.attempt, "Boom: it broke") is not None
    return job.id


async def test_a_failed_job_retried_by_hand_runs_again_with_a_new_budget(
    api: Api, pool: asyncpg.Pool
) -> None:
    job_id = await failed_job(pool)
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{job_id}/retry")
    assert status == 200, body
    assert (body["state"], body["attempt"], body["completed_at"]) == ("PENDING", 0, None)
    # Its history stays.
    assert [e["error"] for e in body["errors"]] == ["Boom: it broke"]
    assert body["last_error"] == "Boom: it broke"
    (again,) = await db.claim(pool, worker_id="w", queues=None, types=["t"], limit=1, lease_s=30)
    assert (again.id, again.attempt, again.max_attempts) == (job_id, 1, 1)
    # Running now: not retryable.
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{job_id}/retry")
    assert status == 409
    assert body["error"] == (
        f"job {job_id} is RUNNING; only FAILED or CANCELLED jobs can be retried"
    )


async def test_a_cancelled_job_can_be_retried_and_others_are_409_or_404(
    api: Api, pool: asyncpg.Pool
) -> None:
    job, _ = await db.insert(pool, NewJob(type="t"))
    status, body, _ = await api.request("DELETE", f"/api/v1/jobs/{job.id}")
    assert (status, body["state"]) == (200, "CANCELLED")
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{job.id}/retry")
    assert (status, body["state"], body["cancel_requested_at"]) == (200, "PENDING", None)
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{job.id}/retry")
    assert (status, "is PENDING" in body["error"]) == (409, True)
    for unknown in (ids.new_id(), "not-an-id"):
        status, _, _ = await api.request("POST", f"/api/v1/jobs/{unknown}/retry")
        assert status == 404
        status, _, _ = await api.request("POST", f"/api/v1/jobs/{unknown}/run")
        assert status == 404


async def test_run_makes_a_future_job_due_now_and_wakes_the_workers(
    api: Api, pool: asyncpg.Pool, settings: Settings
) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    job, _ = await db.insert(pool, NewJob(type="t", run_at=later))
    listener = await asyncpg.connect(settings.database.url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("orchestrix_jobs", lambda *args: heard.put_nowait(args[2]))
    try:
        status, body, _ = await api.request("POST", f"/api/v1/jobs/{job.id}/run")
        assert status == 200, body
        assert datetime.fromisoformat(body["run_at"]) <= datetime.now(UTC)
        await asyncio.wait_for(heard.get(), 5)
        # Already due: nothing changes.
        status, again, _ = await api.request("POST", f"/api/v1/jobs/{job.id}/run")
        assert (status, again["updated_at"]) == (200, body["updated_at"])
    finally:
        await listener.close()
    claimed = await db.claim(pool, worker_id="w", queues=None, types=["t"], limit=1, lease_s=30)
    assert [c.id for c in claimed] == [job.id]
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{job.id}/run")
    assert status == 409
    assert body["error"] == (
        f"job {job.id} is RUNNING; only PENDING or RETRYING jobs can be run now"
    )
