"""The ``workers`` table's queries on a real database: registration, beats, liveness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from orchestrix.db import workers

REGISTRATION = workers.Registration(
    id="worker-1", hostname="host-a", pid=4242, queues=None, types=("t",), concurrency=8
)


def registration(worker_id: str, **fields: Any) -> workers.Registration:
    return dataclasses.replace(REGISTRATION, id=worker_id, **fields)


@pytest.fixture
async def registry(session_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """The run's database with no worker registered, left so for the next test."""
    await session_pool.execute("TRUNCATE workers")
    yield session_pool
    await session_pool.execute("TRUNCATE workers")


@contextlib.asynccontextmanager
async def session(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own, as a worker's heartbeat opens."""
    conn = await asyncpg.connect(database)
    try:
        yield conn
    finally:
        await conn.close()


async def test_register_records_the_connections_own_session(
    registry: asyncpg.Pool, database: str
) -> None:
    async with session(database) as conn:
        await workers.register(conn, REGISTRATION)
        pid, start = await conn.fetchrow(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
    row = await registry.fetchrow(
        "SELECT backend_pid, backend_start FROM workers WHERE id = $1", REGISTRATION.id
    )
    assert (row["backend_pid"], row["backend_start"]) == (pid, start)
    [worker] = await workers.list_all(registry)
    assert (worker.id, worker.hostname, worker.pid) == ("worker-1", "host-a", 4242)
    assert (worker.queues, list(worker.types), worker.concurrency) == (None, ["t"], 8)
    assert worker.seen_at >= worker.started_at


async def test_registering_again_names_the_new_session(
    registry: asyncpg.Pool, database: str
) -> None:
    async with session(database) as old, session(database) as new:
        await workers.register(old, REGISTRATION)
        await workers.register(new, registration("worker-1", queues=("q",), concurrency=2))
        pid = await new.fetchval("SELECT pg_backend_pid()")
        [worker] = await workers.list_all(registry)
        assert (worker.queues, worker.concurrency) == (["q"], 2)
        assert await registry.fetchval("SELECT backend_pid FROM workers") == pid
        # A reconnect: the old session's beats no longer count.
        assert not await workers.beat(old, "worker-1")
        assert await workers.beat(new, "worker-1")


async def test_beat_counts_only_from_the_registered_session(
    registry: asyncpg.Pool, database: str
) -> None:
    async with session(database) as conn:
        await workers.register(conn, REGISTRATION)
        before = await registry.fetchval("SELECT seen_at FROM workers")
        assert await workers.beat(conn, "worker-1")
        assert await registry.fetchval("SELECT seen_at FROM workers") > before
        assert not await workers.beat(registry, "worker-1")  # another session
        assert not await workers.beat(conn, "worker-2")  # never registered
        await workers.deregister(registry, "worker-1")
        assert not await workers.beat(conn, "worker-1")
        assert await workers.list_all(registry) == []


async def gone(pool: asyncpg.Pool, worker_id: str, timeout_s: float = 10.0) -> list[str]:
    """``session_gone`` once it names ``worker_id``: a closed session ends shortly after."""
    deadline = time.monotonic() + timeout_s
    while worker_id not in (found := await workers.session_gone(pool)):
        assert time.monotonic() < deadline, f"{worker_id} still has a session"
        await asyncio.sleep(0.02)
    return found


async def test_session_gone_names_workers_whose_session_ended(
    registry: asyncpg.Pool, database: str
) -> None:
    async with session(database) as live:
        await workers.register(live, registration("live"))
        async with session(database) as dying:
            await workers.register(dying, registration("dead"))
            assert await workers.session_gone(registry) == []
        assert await gone(registry, "dead") == ["dead"]
        await workers.forget(registry, ["dead"])
        assert [w.id for w in await workers.list_all(registry)] == ["live"]
        assert await workers.session_gone(registry) == []


async def test_a_recycled_pid_is_not_the_registered_session(
    registry: asyncpg.Pool, database: str
) -> None:
    # Another session now holds the registered pid: it started later, so it is not ours.
    async with session(database) as conn:
        await workers.register(conn, REGISTRATION)
        await registry.execute(
            "UPDATE workers SET backend_start = backend_start - interval '1 hour'"
        )
        assert await workers.session_gone(registry) == ["worker-1"]


async def test_served_covers_what_some_registered_worker_runs(
    registry: asyncpg.Pool, database: str
) -> None:
    async with session(database) as first, session(database) as second:
        await workers.register(first, registration("any-queue", queues=None, types=("a",)))
        await workers.register(second, registration("q-only", queues=("q",), types=("b", "c")))
        served = await workers.served(registry)
    assert served.covers("anything", "a")
    assert served.covers("q", "a")
    assert served.covers("q", "b")
    assert served.covers("q", "c")
    assert not served.covers("other", "b")
    assert not served.covers("q", "d")
    await workers.forget(registry, ["any-queue", "q-only"])
    assert not (await workers.served(registry)).covers("q", "a")
