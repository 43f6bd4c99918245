"""Rate limits and queue running limits on a real database: each holds across
concurrent claims, the plain claim never takes a job they govern, and the REST
routes create, change, read and delete limits with clear errors."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from orchestrix.db import concurrency, rate_limits
from orchestrix.db import jobs as db
from orchestrix.db.pool import init_connection
from orchestrix.models import Job, NewJob

from tests.conftest import Api
from tests.integration.limited import waits_for_the_turn

TYPES = ["t"]
BOTH = ["t", "u"]


async def make(pool: asyncpg.Pool, count: int, **fields: object) -> list[str]:
    made = await db.insert_many(pool, [NewJob(type="t", **fields) for _ in range(count)])  # type: ignore[arg-type]
    return [job.id for job, _ in made]


async def claimers(database: str, n: int) -> list[asyncpg.Connection]:
    conns = [
        await asyncpg.connect(database, server_settings=db.CLAIM_SERVER_SETTINGS) for _ in range(n)
    ]
    for conn in conns:
        await init_connection(conn)
    return conns


async def running(pool: asyncpg.Pool, queue: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE state = 'RUNNING' AND queue = $1", queue
    )
    return count


async def test_a_queues_running_limit_holds_across_concurrent_claims(
    pool: asyncpg.Pool, database: str
) -> None:
    await pool.execute("INSERT INTO queues (name, running_limit) VALUES ('narrow', 4)")
    await make(pool, 50, queue="narrow")
    other = await db.insert_many(pool, [NewJob(type="u", queue="narrow") for _ in range(50)])
    assert len(other) == 50  # two types: each is walked for the queue's room
    await make(pool, 3, queue="narrow", concurrency_key="k")  # keyed jobs count too
    conns = await claimers(database, 8)
    try:

        async def claims(conn: asyncpg.Connection, worker: str) -> int:
            got = 0
            for _ in range(10):
                got += len(
                    await concurrency.claim(
                        conn, worker_id=worker, queues=None, types=BOTH, limit=10, lease_s=30
                    )
                )
            return got

        claimed = await asyncio.gather(*(claims(c, f"w{i}") for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    assert sum(claimed) == 4
    assert await running(pool, "narrow") == 4
    # The plain claim passes the queue over.
    assert await db.claim(pool, worker_id="p", queues=None, types=BOTH, limit=10, lease_s=30) == []
    # One ends: room for one more, and only one.
    row = await pool.fetchrow("SELECT id, attempt FROM jobs WHERE state = 'RUNNING' LIMIT 1")
    assert await db.succeed(pool, row["id"], row["attempt"], None) is not None
    assert await concurrency.any_waiting(pool)
    async with pool.acquire() as conn:
        again = await concurrency.claim(
            conn, worker_id="w", queues=None, types=BOTH, limit=10, lease_s=30
        )
    assert len(again) == 1
    assert await running(pool, "narrow") == 4


async def test_a_rate_limit_holds_across_concurrent_claims(
    pool: asyncpg.Pool, database: str
) -> None:
    """10 starts a second with a burst of 5, eight claimers for 1.5 s: at most
    5 + 10 * elapsed start, and the bucket is not left unused either."""
    assert await rate_limits.create(pool, "api", 10.0, 5) is not None
    await make(pool, 200, rate_limit="api")
    plain = await make(pool, 2)
    conns = await claimers(database, 8)
    started = time.monotonic()
    try:

        async def claims(conn: asyncpg.Connection, worker: str) -> int:
            got = 0
            while time.monotonic() - started < 1.5:
                got += len(
                    await concurrency.claim(
                        conn, worker_id=worker, queues=None, types=TYPES, limit=50, lease_s=30
                    )
                )
                await asyncio.sleep(0.01)
            return got

        claimed = sum(await asyncio.gather(*(claims(c, f"w{i}") for i, c in enumerate(conns))))
    finally:
        elapsed = time.monotonic() - started
        for conn in conns:
            await conn.close()
    assert claimed <= 5 + 10 * elapsed
    assert claimed >= 5 + 10 * 1.5 * 0.8
    # Rate-limited jobs are not the plain claim's; the others are.
    taken = await db.claim(pool, worker_id="p", queues=None, types=TYPES, limit=50, lease_s=30)
    assert sorted(job.id for job in taken) == sorted(plain)


async def other_types(pool: asyncpg.Pool) -> list[Job]:
    async with pool.acquire() as conn:
        return await concurrency.claim(
            conn, worker_id="w2", queues=None, types=["u"], limit=10, lease_s=30
        )


async def test_a_claim_for_other_types_of_a_limited_queue_waits_for_the_turn(
    pool: asyncpg.Pool, database: str
) -> None:
    await pool.execute("INSERT INTO queues (name, running_limit) VALUES ('narrow', 2)")
    for job_type in BOTH:
        await db.insert_many(pool, [NewJob(type=job_type, queue="narrow") for _ in range(2)])
    assert await waits_for_the_turn(database, ["t"], other_types(pool)) == []
    assert await running(pool, "narrow") == 2


async def test_a_claim_for_other_types_of_a_rate_limit_waits_for_the_turn(
    pool: asyncpg.Pool, database: str
) -> None:
    assert await rate_limits.create(pool, "slow", 0.001, 2) is not None
    for job_type in BOTH:
        await db.insert_many(pool, [NewJob(type=job_type, rate_limit="slow") for _ in range(2)])
    # The first takes the bucket's two tokens; the second sees them spent.
    assert await waits_for_the_turn(database, ["t"], other_types(pool)) == []


async def test_a_key_and_a_rate_limit_both_hold(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO queues (name, key_limit) VALUES ('default', 3)")
    assert await rate_limits.create(pool, "slow", 0.001, 2) is not None
    await make(pool, 10, concurrency_key="a", rate_limit="slow")
    await make(pool, 10, concurrency_key="b")
    async with pool.acquire() as conn:
        claimed = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=50, lease_s=30
        )
    by_key = {key: sum(1 for j in claimed if j.concurrency_key == key) for key in "ab"}
    assert by_key == {"a": 2, "b": 3}  # a: the bucket's 2 tokens; b: its key's limit
    found = await rate_limits.get(pool, "slow")
    assert found is not None
    assert found.available < 0.1


async def test_a_job_naming_a_missing_limit_waits(pool: asyncpg.Pool) -> None:
    await make(pool, 1, rate_limit="gone")
    async with pool.acquire() as conn:
        assert (
            await concurrency.claim(
                conn, worker_id="w", queues=None, types=TYPES, limit=5, lease_s=30
            )
            == []
        )
    assert await db.claim(pool, worker_id="p", queues=None, types=TYPES, limit=5, lease_s=30) == []
    assert await rate_limits.create(pool, "gone", 100.0, 1) is not None
    async with pool.acquire() as conn:
        claimed = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=5, lease_s=30
        )
    assert len(claimed) == 1


async def test_rate_limits_over_the_api(api: Api) -> None:
    status, limit, _ = await api.request(
        "POST", "/api/v1/rate-limits", json={"name": "payments-api", "per_second": 100}
    )
    assert status == 201, limit
    assert (limit["per_second"], limit["burst"], limit["available"]) == (100.0, 100, 100)
    status, body, _ = await api.request(
        "POST", "/api/v1/rate-limits", json={"name": "payments-api", "per_second": 5}
    )
    assert status == 409
    assert "exists" in body["error"]
    for bad in (
        {"name": "x"},
        {"name": "x", "per_second": 0},
        {"name": "x", "per_second": 5e-324},  # a denormal, which float8 refuses: was a 500
        {"name": "x", "per_second": True},
        {"name": "x", "per_second": 1, "burst": 0},
        {"name": "bad name", "per_second": 1},
        {"name": "x", "per_second": 1, "colour": "red"},
    ):
        status, body, _ = await api.request("POST", "/api/v1/rate-limits", json=bad)
        assert status == 400, bad
        assert "error" in body, bad

    status, changed, _ = await api.request(
        "PATCH", "/api/v1/rate-limits/payments-api", json={"per_second": 50.5, "burst": 10}
    )
    assert status == 200
    assert (changed["per_second"], changed["burst"], changed["available"]) == (50.5, 10, 10)
    status, body, _ = await api.request("PATCH", "/api/v1/rate-limits/payments-api", json={})
    assert status == 400
    status, body, _ = await api.request("PATCH", "/api/v1/rate-limits/nope", json={"burst": 3})
    assert status == 404

    status, listed, _ = await api.request("GET", "/api/v1/rate-limits")
    assert [x["name"] for x in listed["rate_limits"]] == ["payments-api"]

    status, job, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "rate_limit": "payments-api"}
    )
    assert (status, job["rate_limit"]) == (201, "payments-api")
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "rate_limit": "unknown"}
    )
    assert status == 422
    assert "unknown" in body["error"]
    status, body, _ = await api.request(
        "POST",
        "/api/v1/jobs/batch",
        json={"jobs": [{"type": "t"}, {"type": "t", "rate_limit": "unknown"}]},
    )
    assert status == 422
    status, body, _ = await api.request(
        "POST",
        "/api/v1/workflows",
        json={"jobs": [{"key": "a", "type": "t", "rate_limit": "unknown"}]},
    )
    assert status == 422

    status, body, _ = await api.request("DELETE", "/api/v1/rate-limits/payments-api")
    assert status == 409
    assert "1 unfinished" in body["error"]
    status, _, _ = await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    assert status in (200, 202)
    status, deleted, _ = await api.request("DELETE", "/api/v1/rate-limits/payments-api")
    assert (status, deleted["name"]) == (200, "payments-api")
    status, _, _ = await api.request("GET", "/api/v1/rate-limits/payments-api")
    assert status == 404


async def test_a_queues_running_limit_over_the_api(api: Api) -> None:
    status, queue, _ = await api.request(
        "PATCH", "/api/v1/queues/narrow", json={"running_limit": 7}
    )
    assert (status, queue["running_limit"], queue["key_limit"]) == (200, 7, None)
    status, queue, _ = await api.request("PATCH", "/api/v1/queues/narrow", json={"key_limit": 2})
    assert (queue["running_limit"], queue["key_limit"]) == (7, 2)  # the other one stays
    status, queue, _ = await api.request(
        "PATCH", "/api/v1/queues/narrow", json={"running_limit": None}
    )
    assert (queue["running_limit"], queue["key_limit"]) == (None, 2)
    for bad in ({"running_limit": 0}, {"running_limit": 1.5}, {"key_limit": 1, "x": 1}):
        status, _body, _ = await api.request("PATCH", "/api/v1/queues/narrow", json=bad)
        assert status == 400, bad
