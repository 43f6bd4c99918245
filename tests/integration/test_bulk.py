"""POST /api/v1/jobs/cancel and /api/v1/jobs/retry over real HTTP, on a real database,
also while claims race them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from orchestrix import ids

from tests.conftest import Api


async def insert(pool: asyncpg.Pool, count: int, job_type: str = "t", **columns: Any) -> list[str]:
    """``count`` jobs of ``job_type``, with these column values."""
    job_ids = [ids.new_id() for _ in range(count)]
    names = ", ".join(["id", "type", *columns])
    values = ", ".join(["unnest($1::text[])", "$2", *(f"${i + 3}" for i in range(len(columns)))])
    await pool.execute(
        f"INSERT INTO jobs ({names}) SELECT {values}", job_ids, job_type, *columns.values()
    )
    return job_ids


FINISHED = {"completed_at": datetime.now(UTC), "started_at": datetime.now(UTC)}


async def states(pool: asyncpg.Pool, job_ids: list[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM jobs WHERE id = ANY($1::text[]) GROUP BY state", job_ids
    )
    return {row["state"]: row["n"] for row in rows}


async def test_cancel_by_queue_walks_every_chunk_and_asks_running_workers(
    api: Api, pool: asyncpg.Pool
) -> None:
    waiting = await insert(pool, 12_000, queue="q")  # more than two chunks
    elsewhere = await insert(pool, 50, queue="other")
    [running] = await insert(pool, 1, queue="q")
    await pool.execute(
        "UPDATE jobs SET state = 'RUNNING', attempt = 1, started_at = now(), worker_id = 'w'"
        " WHERE id = $1",
        running,
    )
    status, body, _ = await api.request("POST", "/api/v1/jobs/cancel", json={"queue": "q"})
    assert (status, body) == (200, {"cancelled": 12_000, "cancel_requested": 1})
    assert await states(pool, waiting) == {"CANCELLED": 12_000}
    assert await states(pool, elsewhere) == {"PENDING": 50}
    row = await pool.fetchrow("SELECT state, cancel_requested_at FROM jobs WHERE id = $1", running)
    assert row["state"] == "RUNNING"
    assert row["cancel_requested_at"] is not None
    # Again: nothing is left to change.
    status, body, _ = await api.request("POST", "/api/v1/jobs/cancel", json={"queue": "q"})
    assert (status, body) == (200, {"cancelled": 0, "cancel_requested": 1})


async def test_retry_by_state_type_ids_and_creation_time(api: Api, pool: asyncpg.Pool) -> None:
    failed = await insert(pool, 30, "mail", state="FAILED", attempt=3, **FINISHED)
    other_type = await insert(pool, 5, "sms", state="FAILED", attempt=3, **FINISHED)
    succeeded = await insert(pool, 5, "mail", state="SUCCEEDED", attempt=1, **FINISHED)
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs/retry", json={"state": "FAILED", "type": "mail"}
    )
    assert (status, body) == (200, {"retried": 30})
    assert await states(pool, failed) == {"PENDING": 30}
    assert (
        await pool.fetchval("SELECT max(attempt) FROM jobs WHERE id = ANY($1::text[])", failed) == 0
    )
    assert await states(pool, other_type) == {"FAILED": 5}
    assert await states(pool, succeeded) == {"SUCCEEDED": 5}
    # By ids: only those, and only the retryable among them.
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs/retry", json={"ids": other_type[:2] + succeeded[:2]}
    )
    assert (status, body) == (200, {"retried": 2})
    # By creation time: none was created in the future.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    status, body, _ = await api.request("POST", "/api/v1/jobs/retry", json={"created_after": later})
    assert (status, body) == (200, {"retried": 0})
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs/retry", json={"created_before": later}
    )
    assert (status, body) == (200, {"retried": 3})


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("cancel", {}, "select the jobs"),
        ("cancel", {"state": None}, "null is not a selection"),
        ("cancel", {"queue": None, "type": "t"}, "null is not a selection"),
        (
            "cancel",
            {"state": "SUCCEEDED"},
            "state must be one of PENDING, WAITING, RETRYING, RUNNING",
        ),
        ("cancel", {"state": "pending"}, "state must be one of"),
        ("retry", {"state": "PENDING"}, "state must be one of FAILED, CANCELLED"),
        ("retry", {"ids": []}, "ids must be an array of 1 to 10000 job ids"),
        ("retry", {"ids": ["nope"]}, "ids must be an array"),
        ("retry", {"colour": "red"}, "unknown field"),
        ("cancel", {"queue": "a b"}, "queue must be a string matching"),
        ("cancel", {"created_after": "yesterday"}, "created_after must be an RFC 3339 time"),
    ],
)
async def test_bad_selections_are_400_and_change_nothing(
    api: Api, pool: asyncpg.Pool, path: str, body: dict[str, Any], message: str
) -> None:
    job_ids = await insert(pool, 3)
    status, answer, _ = await api.request("POST", f"/api/v1/jobs/{path}", json=body)
    assert status == 400, answer
    assert message in answer["error"]
    assert await states(pool, job_ids) == {"PENDING": 3}


async def test_a_bulk_cancel_racing_claims_never_cancels_a_claimed_job(
    api: Api, pool: asyncpg.Pool
) -> None:
    from orchestrix.db import jobs as db

    job_ids = await insert(pool, 20_000)
    claimed: list[str] = []
    done = asyncio.Event()

    async def claim_meanwhile() -> None:
        while not done.is_set():
            jobs = await db.claim(
                pool, worker_id="w", queues=None, types=["t"], limit=50, lease_s=30
            )
            claimed.extend(job.id for job in jobs)
            await asyncio.sleep(0.01)  # at most 5,000 jobs/s: the cancel gets some too

    claimer = asyncio.create_task(claim_meanwhile())
    try:
        status, body, _ = await api.request("POST", "/api/v1/jobs/cancel", json={"type": "t"})
    finally:
        done.set()
        await claimer
    assert status == 200, body
    assert claimed, "no claim ran beside the bulk cancel"
    assert len(claimed) < len(job_ids), "the claims took every job before the cancel ran"
    # Every job was either claimed (RUNNING, its cancel asked of its worker) or
    # cancelled before any worker had it: none moved against the state table.
    assert await states(pool, claimed) == {"RUNNING": len(claimed)}
    rest = sorted(set(job_ids) - set(claimed))
    assert await states(pool, rest) == {"CANCELLED": len(rest)}
    assert body["cancelled"] == len(rest)
    assert body["cancel_requested"] <= len(claimed)


async def test_a_bulk_retry_shares_its_chunks_with_a_spare_connection(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a spare connection, chunks are written on both at once; every selected
    job is moved once (one event each), and the rest is left alone."""
    from orchestrix.db import bulk

    monkeypatch.setattr(bulk, "CHUNK", 10)
    failed = await insert(pool, 95, "t", state="FAILED", attempt=1, **FINISHED)
    other = await insert(pool, 7, "u", state="FAILED", attempt=1, **FINISHED)
    chunks_on: dict[str, int] = {"given": 0, "spare": 0}

    class Counted:
        """A connection that counts the chunks written on it."""

        def __init__(self, conn: Any, name: str) -> None:
            self._conn, self._name = conn, name

        async def fetchrow(self, sql: str, *args: Any) -> Any:
            row = await self._conn.fetchrow(sql, *args)
            chunks_on[self._name] += 1
            await asyncio.sleep(0.02)  # so that one writer cannot take every range
            return row

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    @contextlib.asynccontextmanager
    async def spare() -> AsyncIterator[Any]:
        async with pool.acquire() as conn:
            yield Counted(conn, "spare")

    async with pool.acquire() as conn:
        retried = await bulk.retry(Counted(conn, "given"), bulk.Selection(type="t"), spare)
    assert retried == 95
    assert chunks_on["given"] > 0, chunks_on
    assert chunks_on["spare"] > 0, chunks_on
    assert sum(chunks_on.values()) == 10  # nine full ranges and the rest
    assert await states(pool, failed) == {"PENDING": 95}
    assert await states(pool, other) == {"FAILED": 7}
    moves = await pool.fetch(
        "SELECT job_id, count(*) AS n FROM job_events WHERE to_state = 'PENDING'"
        " AND from_state = 'FAILED' GROUP BY job_id"
    )
    assert sorted(row["job_id"] for row in moves) == sorted(failed)
    assert {row["n"] for row in moves} == {1}


async def test_a_request_never_waits_on_a_full_pool_for_a_spare_connection(
    settings: Any,
) -> None:
    """A request that holds the pool's last connection gets no spare (at once): two
    requests each holding one and waiting for another would wait for ever."""
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web import Application
    from orchestrix.db.pool import create_pool
    from orchestrix.services.api import auth
    from orchestrix.services.api.keys import POOL

    small = await create_pool(settings.database, min_size=1, max_size=2)
    try:
        app = Application()
        app[POOL] = small
        request = make_mocked_request("POST", "/api/v1/jobs/retry", app=app)
        async with auth.connection(request) as first:
            async with auth.spare_connection(request) as second:
                assert second is not None  # the pool had one more
                assert await second.fetchval("SELECT 1") == 1
                async with asyncio.timeout(auth.SPARE_WAIT_S / 5):  # at once, no wait
                    async with auth.spare_connection(request) as third:
                        assert third is None
            assert await first.fetchval("SELECT 1") == 1
        assert small.get_idle_size() == 2  # both went back
    finally:
        await small.close()
