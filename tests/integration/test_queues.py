"""/api/v1/queues over real HTTP, and the claim that honours a pause, on a real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from orchestrix.db import counts, queues
from orchestrix.db import jobs as db
from orchestrix.models import NewJob
from orchestrix.settings import Settings
from orchestrix.states import JobState

from tests.conftest import Api

LEASE_S = 30.0


async def claim(pool: asyncpg.Pool, limit: int = 100) -> list[str]:
    jobs = await db.claim(
        pool, worker_id="w", queues=None, types=["t"], limit=limit, lease_s=LEASE_S
    )
    return sorted(job.queue for job in jobs)


async def test_a_paused_queue_is_not_claimed_and_resuming_releases_it(pool: asyncpg.Pool) -> None:
    for queue in ("a", "a", "b"):
        await db.insert(pool, NewJob(type="t", queue=queue))
    await queues.pause(pool, "a")
    assert await claim(pool) == ["b"]
    assert await claim(pool) == []
    assert await queues.resume(pool, "a")
    assert not await queues.resume(pool, "a")  # not paused any more
    assert await claim(pool) == ["a", "a"]


async def test_queues_list_counts_by_state_and_the_oldest_due_job(
    api: Api, pool: asyncpg.Pool
) -> None:
    status, body, _ = await api.request("GET", "/api/v1/queues")
    assert (status, body) == (200, {"queues": []})
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    await db.insert(pool, NewJob(type="t", queue="mail", run_at=long_ago))
    await db.insert(pool, NewJob(type="t", queue="mail"))
    await db.insert(pool, NewJob(type="t", queue="mail", run_at=datetime.now(UTC) + timedelta(1)))
    done, _ = await db.insert(pool, NewJob(type="t", queue="reports"))
    await pool.execute(
        "UPDATE jobs SET state = 'SUCCEEDED', attempt = 1, started_at = now(),"
        " completed_at = now() WHERE id = $1",
        done.id,
    )

    status, body, _ = await api.request("GET", "/api/v1/queues")
    assert status == 200
    mail, reports = body["queues"]
    assert mail["name"] == "mail"
    assert not mail["paused"]
    assert mail["paused_at"] is None
    assert mail["jobs"]["PENDING"] == 3
    assert mail["total"] == 3
    assert set(mail["jobs"]) == {state.value for state in JobState}
    # The future job is not due: the oldest due one is the one of ten minutes ago.
    assert datetime.fromisoformat(mail["oldest_due_at"]) == long_ago
    assert 590 < mail["oldest_due_age_seconds"] < 700
    assert reports["jobs"]["SUCCEEDED"] == 1
    assert reports["total"] == 1
    assert reports["oldest_due_at"] is None
    assert reports["oldest_due_age_seconds"] is None


async def test_queue_counts_are_the_kept_counts_folded_or_not(api: Api, pool: asyncpg.Pool) -> None:
    await db.insert(pool, NewJob(type="t", queue="mail"))
    await db.insert(pool, NewJob(type="t", queue="news"))
    async with pool.acquire() as conn:
        assert await counts.fold(conn, 1000)
    await db.insert(pool, NewJob(type="t", queue="mail"))  # a delta, not folded yet
    status, body, _ = await api.request("GET", "/api/v1/queues/mail")
    assert (status, body["jobs"]["PENDING"], body["total"]) == (200, 2, 2)
    # What the endpoint reads is job_counts, not a pass over the jobs: a count
    # changed by hand shows (and no other queue's).
    await pool.execute("UPDATE job_counts SET n = n + 40 WHERE queue = 'mail'")
    status, body, _ = await api.request("GET", "/api/v1/queues")
    assert [(q["name"], q["jobs"]["PENDING"]) for q in body["queues"]] == [
        ("mail", 42),
        ("news", 1),
    ]


async def test_pause_and_resume_over_http(api: Api, pool: asyncpg.Pool, settings: Settings) -> None:
    await db.insert(pool, NewJob(type="t", queue="mail"))
    status, body, _ = await api.request("POST", "/api/v1/queues/mail/pause")
    assert status == 200
    assert body["paused"]
    assert body["jobs"]["PENDING"] == 1
    paused_at = body["paused_at"]
    # Pausing again keeps the first pause's time.
    status, body, _ = await api.request("POST", "/api/v1/queues/mail/pause")
    assert (status, body["paused_at"]) == (200, paused_at)
    status, body, _ = await api.request("GET", "/api/v1/queues/mail")
    assert (status, body["paused"]) == (200, True)

    # Resuming wakes the workers: the channel new jobs use.
    listener = await asyncpg.connect(settings.database.url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("orchestrix_jobs", lambda *args: heard.put_nowait(args[2]))
    try:
        status, body, _ = await api.request("POST", "/api/v1/queues/mail/resume")
        assert status == 200
        assert not body["paused"]
        assert body["paused_at"] is None
        await asyncio.wait_for(heard.get(), 5)
        # A resume of a queue that is not paused changes nothing, and wakes no one.
        status, body, _ = await api.request("POST", "/api/v1/queues/mail/resume")
        assert (status, body["paused"]) == (200, False)
        await asyncio.sleep(0.2)
        assert heard.empty()
    finally:
        await listener.close()


async def test_a_queue_without_jobs_can_be_paused_and_unknown_ones_are_404(api: Api) -> None:
    status, body, _ = await api.request("GET", "/api/v1/queues/later")
    assert status == 404
    assert "later" in body["error"]
    status, body, _ = await api.request("POST", "/api/v1/queues/later/resume")
    assert status == 404
    status, body, _ = await api.request("POST", "/api/v1/queues/later/pause")
    assert status == 200
    assert body["paused"]
    assert body["total"] == 0
    status, body, _ = await api.request("GET", "/api/v1/queues")
    assert [queue["name"] for queue in body["queues"]] == ["later"]


async def test_bad_queue_names_are_400(api: Api, pool: asyncpg.Pool) -> None:
    for name in ("has%20space", "x" * 65, "d%C3%A9j%C3%A0", "nl%0A"):
        for method, suffix in (("GET", ""), ("POST", "/pause"), ("POST", "/resume")):
            status, body, _ = await api.request(method, f"/api/v1/queues/{name}{suffix}")
            assert status == 400, (method, name, body)
            assert "queue must be a string matching" in body["error"]
    assert await pool.fetchval("SELECT count(*) FROM queues") == 0


async def test_a_job_due_since_year_1_has_a_finite_age(api: Api) -> None:
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "run_at": "0001-01-01T00:00:00Z"}
    )
    assert status == 201, body
    status, body, _ = await api.request("GET", "/api/v1/queues/default")
    assert status == 200, body
    assert body["oldest_due_at"] == "0001-01-01T00:00:00.000000Z"
    assert body["oldest_due_age_seconds"] > 2025 * 365 * 86400
