"""Concurrency keys on a real database: a key's limit holds across concurrent claims,
keys share room in turns, a key's jobs go in priority order, and the plain claim
never takes a keyed job."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from orchestrix.db import concurrency
from orchestrix.db import jobs as db
from orchestrix.db.pool import init_connection
from orchestrix.models import Job, NewJob

from tests.conftest import Api
from tests.integration.limited import waits_for_the_turn
from tests.integration.test_job_queries import as_worker, explain, scans_of_jobs

TYPES = ["t"]


async def keyed(pool: asyncpg.Pool, key: str, count: int, **fields: object) -> list[str]:
    made = await db.insert_many(
        pool,
        [NewJob(type="t", concurrency_key=key, **fields) for _ in range(count)],  # type: ignore[arg-type]
    )
    return [job.id for job, _ in made]


async def set_limit(pool: asyncpg.Pool, queue: str, limit: int) -> None:
    await pool.execute(
        "INSERT INTO queues (name, key_limit) VALUES ($1, $2) "
        "ON CONFLICT (name) DO UPDATE SET key_limit = excluded.key_limit",
        queue,
        limit,
    )


async def running(pool: asyncpg.Pool, key: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE state = 'RUNNING' AND concurrency_key = $1", key
    )
    return count


async def test_a_keys_limit_holds_across_concurrent_claims(
    pool: asyncpg.Pool, database: str
) -> None:
    await set_limit(pool, "default", 5)
    await keyed(pool, "customer-1", 200)
    conns = [
        await asyncpg.connect(database, server_settings=db.CLAIM_SERVER_SETTINGS) for _ in range(8)
    ]
    try:
        for conn in conns:
            await init_connection(conn)

        async def claims(conn: asyncpg.Connection, worker: str) -> int:
            got = 0
            for _ in range(10):
                got += len(
                    await concurrency.claim(
                        conn, worker_id=worker, queues=None, types=TYPES, limit=3, lease_s=30
                    )
                )
            return got

        claimed = await asyncio.gather(*(claims(c, f"w{i}") for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    assert sum(claimed) == 5
    assert await running(pool, "customer-1") == 5
    # One ends: room for one more, and only one.
    [job_id] = await pool.fetch("SELECT id, attempt FROM jobs WHERE state = 'RUNNING' LIMIT 1")
    assert await db.succeed(pool, job_id["id"], job_id["attempt"], None) is not None
    async with pool.acquire() as conn:
        again = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=10, lease_s=30
        )
    assert len(again) == 1
    assert await running(pool, "customer-1") == 5


async def test_keys_take_turns_and_a_backlog_does_not_hold_another_key_back(
    pool: asyncpg.Pool,
) -> None:
    await set_limit(pool, "default", 10)
    await keyed(pool, "big", 1000)
    small = await keyed(pool, "small", 3)
    async with pool.acquire() as conn:
        claimed = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=8, lease_s=30
        )
    by_key = {key: [j for j in claimed if j.concurrency_key == key] for key in ("big", "small")}
    assert sorted(j.id for j in by_key["small"]) == sorted(small)  # all three at once
    assert len(by_key["big"]) == 5


async def test_within_a_key_priority_then_run_at(pool: asyncpg.Pool) -> None:
    low = await keyed(pool, "k", 2)
    [high] = await keyed(pool, "k", 1, priority=10)
    async with pool.acquire() as conn:
        [first] = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=5, lease_s=30
        )
        assert first.id == high  # the default limit is 1
        assert await db.succeed(conn, first.id, first.attempt, None) is not None
        [second] = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=5, lease_s=30
        )
    assert second.id == low[0]


async def test_the_plain_claim_never_takes_a_keyed_job(pool: asyncpg.Pool) -> None:
    await keyed(pool, "k", 3)
    plain, _ = await db.insert(pool, NewJob(type="t"))
    claimed = await db.claim(pool, worker_id="w", queues=None, types=TYPES, limit=10, lease_s=30)
    assert [job.id for job in claimed] == [plain.id]
    assert await concurrency.any_waiting(pool)


async def test_a_paused_queue_and_other_types_are_left_alone(pool: asyncpg.Pool) -> None:
    await keyed(pool, "k", 1, queue="paused")
    await pool.execute("INSERT INTO queues (name, paused_at) VALUES ('paused', now())")
    await keyed(pool, "k", 1)
    async with pool.acquire() as conn:
        assert (
            await concurrency.claim(
                conn, worker_id="w", queues=None, types=["other"], limit=5, lease_s=30
            )
            == []
        )
        claimed = await concurrency.claim(
            conn, worker_id="w", queues=None, types=TYPES, limit=5, lease_s=30
        )
    assert [job.queue for job in claimed] == ["default"]  # a key counts per queue


async def test_concurrency_key_over_the_api_and_the_queues_limit(api: Api) -> None:
    status, job, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "concurrency_key": "customer-7"}
    )
    assert (status, job["concurrency_key"]) == (201, "customer-7")
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "concurrency_key": ""}
    )
    assert status == 400
    assert "concurrency_key" in body["error"]
    status, queue, _ = await api.request("PATCH", "/api/v1/queues/default", json={"key_limit": 5})
    assert (status, queue["key_limit"]) == (200, 5)
    status, queue, _ = await api.request("GET", "/api/v1/queues/default")
    assert queue["key_limit"] == 5
    status, queue, _ = await api.request(
        "PATCH", "/api/v1/queues/default", json={"key_limit": None}
    )
    assert (status, queue["key_limit"]) == (200, None)
    for bad in ({"key_limit": 0}, {"key_limit": "5"}, {"limit": 5}, {}):
        status, body, _ = await api.request("PATCH", "/api/v1/queues/default", json=bad)
        assert status == 400, bad


async def test_a_workers_claims_go_round_the_keys(pool: asyncpg.Pool) -> None:
    await set_limit(pool, "default", 100)
    for key in ("a", "b", "c"):
        await keyed(pool, key, 3)

    async def keys_of_claims(round_: concurrency.Round | None) -> list[str | None]:
        got = []
        async with pool.acquire() as conn:
            for _ in range(4):
                [job] = await concurrency.claim(
                    conn,
                    worker_id="w",
                    queues=None,
                    types=TYPES,
                    limit=1,
                    lease_s=30,
                    round_=round_,
                )
                got.append(job.concurrency_key)
        return got

    assert await keys_of_claims(concurrency.Round()) == ["a", "b", "c", "a"]
    # Without a round every claim begins at the first key: a's last job, then b's.
    assert await keys_of_claims(None) == ["a", "b", "b", "c"]


async def test_a_claim_for_other_types_of_a_key_waits_for_the_turn(
    pool: asyncpg.Pool, database: str
) -> None:
    # Two workers serving different types of one key: the second must not count
    # the key's running jobs before the first claim on it has committed.
    await set_limit(pool, "default", 2)
    for job_type in ("t1", "t2"):
        await db.insert_many(pool, [NewJob(type=job_type, concurrency_key="k") for _ in range(2)])

    async def other_types() -> list[Job]:
        async with pool.acquire() as conn:
            return await concurrency.claim(
                conn, worker_id="w2", queues=None, types=["t2"], limit=2, lease_s=30
            )

    assert await waits_for_the_turn(database, ["t1"], other_types()) == []
    assert await running(pool, "k") == 2


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
async def test_the_limited_claim_reads_through_indexes_beside_one_keys_backlog(
    pool: asyncpg.Pool, database: str, generic: bool
) -> None:
    # The statistics see one key only; the claim must still find another key's one
    # job by the index (a scan for it took 30 ms a key at 100,000 jobs).
    await set_limit(pool, "default", 50)
    await pool.execute(
        "INSERT INTO jobs (id, type, concurrency_key) "
        "SELECT '1' || lpad(n::text, 25, '0'), 't', 'big' FROM generate_series(1, 20000) AS n"
    )
    await pool.execute("ANALYZE jobs")
    await keyed(pool, "small-1", 1)
    await keyed(pool, "small-2", 1)
    args = "NULL, '{t}', 75, 'w', 30, 'default', 'big'"
    async with as_worker(database) as conn:
        if generic:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(
            "PREPARE limited(text[], text[], int, text, float8, text, text) AS "
            + concurrency._CLAIM_LIMITED
        )
        plan = await explain(conn, f"EXECUTE limited({args})")
        assert "Seq Scan" not in {node["Node Type"] for node in scans_of_jobs(plan)}
