"""Every job's history, on a real database and over real HTTP: the events each move
writes, who they name, the feed's order, ``GET /api/v1/events`` and ``?wait=``."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from orchestrix import ids
from orchestrix.db import bulk, events, schedules
from orchestrix.db import jobs as db
from orchestrix.db.events import EventFilter
from orchestrix.db.pool import create_pool
from orchestrix.lifecycle import actor, session_settings
from orchestrix.metrics import SchedulerMetrics
from orchestrix.models import NewJob
from orchestrix.services.api import feed as feed_module
from orchestrix.services.api.app import build_app
from orchestrix.services.api.feed import Feed
from orchestrix.services.scheduler.rescuer import Rescuer
from orchestrix.settings import RecoverySettings, RetrySettings, Settings
from orchestrix.states import JobState

from tests.conftest import Api, served

S = JobState
WORKER = "w1"


async def history(pool: asyncpg.Pool, job_id: str) -> list[tuple[S | None, S, int, str | None]]:
    return [
        (e.from_state, e.to_state, e.attempt, e.actor) for e in await events.for_job(pool, job_id)
    ]


async def run_through(pool: asyncpg.Pool, job_id: str, *, fail_first: bool = False) -> None:
    """Claim and finish the job as a worker would (one failed attempt first, if asked)."""
    for attempt in (1, 2) if fail_first else (1,):
        await pool.execute(
            "UPDATE jobs SET run_at = now() - interval '1 second' WHERE id = $1", job_id
        )
        [claimed] = await db.claim(
            pool, worker_id=WORKER, queues=None, types=["t"], limit=1, lease_s=30
        )
        assert (claimed.id, claimed.attempt) == (job_id, attempt)
        if fail_first and attempt == 1:
            assert await db.retry(pool, job_id, 1, "boom", 0.0, worker_id=WORKER) is not None
    assert await db.succeed_many(pool, [(job_id, claimed.attempt, {"ok": 1})], worker_id=WORKER)


# --- what each move writes --------------------------------------------------------------


async def test_a_jobs_life_is_its_events_in_order(pool: asyncpg.Pool) -> None:
    job, _ = await db.insert(pool, NewJob(type="t"))
    await run_through(pool, job.id, fail_first=True)
    assert await history(pool, job.id) == [
        (None, S.PENDING, 0, None),
        (S.PENDING, S.RUNNING, 1, f"worker:{WORKER}"),
        (S.RUNNING, S.RETRYING, 1, f"worker:{WORKER}"),
        (S.RETRYING, S.RUNNING, 2, f"worker:{WORKER}"),
        (S.RUNNING, S.SUCCEEDED, 2, f"worker:{WORKER}"),
    ]
    # An operator's retry starts again from 0; the event names the attempt reached.
    assert await db.retry_by_hand(pool, job.id) is None  # SUCCEEDED: not retryable
    await pool.execute("UPDATE jobs SET state = 'FAILED' WHERE id = $1", job.id)
    await db.retry_by_hand(pool, job.id)
    assert (await history(pool, job.id))[-1] == (S.FAILED, S.PENDING, 2, None)


async def test_creations_write_one_event_per_job_created(pool: asyncpg.Pool) -> None:
    batch = [
        NewJob(type="t", idempotency_key="k"),
        NewJob(type="t", idempotency_key="k"),  # the same job again
        NewJob(type="u", queue="q"),
    ]
    results = await db.insert_many(pool, batch)
    first, again, other = (job for job, _ in results)
    assert first.id == again.id
    assert await history(pool, first.id) == [(None, S.PENDING, 0, None)]
    [event] = await events.for_job(pool, other.id)
    assert (event.queue, event.type, event.at) == ("q", "u", other.created_at)
    # A key used before: the job it names, and no new event.
    job, created = await db.insert(pool, NewJob(type="t", idempotency_key="k"))
    assert (job.id, created) == (first.id, False)
    assert len(await events.for_job(pool, first.id)) == 1


async def test_the_events_name_the_process_that_moved_the_job(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """An API's session, a schedule, a rescuer: each event says who."""
    api_pool = await create_pool(settings.database, server_settings=session_settings("api"))
    try:
        job, _ = await db.insert(api_pool, NewJob(type="t"))
        cancelled = await db.cancel(api_pool, job.id)
        assert cancelled is not None
    finally:
        await api_pool.close()
    assert await history(pool, job.id) == [
        (None, S.PENDING, 0, actor("api")),
        (S.PENDING, S.CANCELLED, 0, actor("api")),
    ]

    tick_at = datetime(2026, 1, 1, tzinfo=UTC)
    template = {
        "type": "t",
        "payload": {},
        "queue": "default",
        "priority": 0,
        "max_attempts": 3,
        "timeout_seconds": 60,
    }
    values = {
        "cron": "0 0 * * *",
        "timezone": "UTC",
        "job": template,
        "missed": "skip",
        "catch_up_seconds": 60,
        "overlap": "allow",
        "paused": False,
    }
    sched = await schedules.create(pool, "nightly", values, tick_at)
    assert sched is not None
    tick_job = await schedules.insert_tick(pool, sched, tick_at)
    assert tick_job is not None
    assert await history(pool, tick_job) == [(None, S.PENDING, 0, "schedule:nightly")]

    # A lease that ran out long ago: the rescuer takes the attempt back.
    [claimed] = await db.claim(
        pool, worker_id=WORKER, queues=None, types=["t"], limit=1, lease_s=30
    )
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 minute' WHERE id = $1", claimed.id
    )
    rescuer = Rescuer(pool, RecoverySettings(), RetrySettings(), SchedulerMetrics())
    assert await rescuer.run_once() == 1
    assert (await history(pool, claimed.id))[-1] == (S.RUNNING, S.RETRYING, 1, actor("rescuer"))


async def test_bulk_actions_write_an_event_per_job_they_move(pool: asyncpg.Pool) -> None:
    pending = [job.id for job, _ in await db.insert_many(pool, [NewJob(type="t")] * 3)]
    retrying = pending.pop()
    await pool.execute("UPDATE jobs SET state = 'RETRYING', attempt = 1 WHERE id = $1", retrying)
    running = (await db.insert(pool, NewJob(type="t")))[0].id
    await pool.execute("UPDATE jobs SET state = 'RUNNING', attempt = 1 WHERE id = $1", running)
    selection = bulk.Selection(ids=[*pending, retrying, running])
    assert await bulk.cancel(pool, selection) == (3, [running])
    for job_id in pending:
        assert (await history(pool, job_id))[1:] == [(S.PENDING, S.CANCELLED, 0, None)]
    assert (await history(pool, retrying))[1:] == [(S.RETRYING, S.CANCELLED, 1, None)]
    assert (await history(pool, running))[1:] == []  # asked to stop: not a move yet

    assert await bulk.retry(pool, selection) == 3
    assert (await history(pool, retrying))[2:] == [(S.CANCELLED, S.PENDING, 1, None)]


# --- the feed ---------------------------------------------------------------------------


async def test_the_feed_holds_back_what_an_open_transaction_may_still_commit_before(
    pool: asyncpg.Pool,
) -> None:
    """An event written by a transaction still open must not be passed over once a
    later transaction's event is read: the feed stops below the oldest one open."""
    start = await events.last_position(pool)
    async with pool.acquire() as slow:
        tx = slow.transaction()
        await tx.start()
        early, _ = await db.insert(slow, NewJob(type="t"))  # the lower xid, not committed
        late, _ = await db.insert(pool, NewJob(type="t"))  # committed at once
        assert await events.after(pool, start, limit=10) == []
        await tx.commit()
    read = await events.after(pool, start, limit=10)
    assert [e.job_id for e in read] == [early.id, late.id]
    # From the first one's position on, only the second; and nothing past the last.
    assert [e.job_id for e in await events.after(pool, read[0].position, limit=10)] == [late.id]
    assert await events.after(pool, read[1].position, limit=10) == []
    assert await events.last_position(pool) == read[1].position


async def test_an_aborted_transaction_leaves_no_event(pool: asyncpg.Pool) -> None:
    start = await events.last_position(pool)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await db.insert(conn, NewJob(type="t"))
        await tx.rollback()
    assert await events.after(pool, start, limit=10) == []


def test_positions_read_back_as_written() -> None:
    assert events.parse_position(events.format_position((123, 45))) == (123, 45)
    for bad in ("", "12", "a-1", "1-b", "-1-2", "1--2", f"{2**63}-1", "1-2-3"):
        assert events.parse_position(bad) is None, bad


async def collect(subscription: feed_module.Subscription, want: int) -> list[events.Event]:
    got: list[events.Event] = []
    async with asyncio.timeout(10):
        while len(got) < want:
            got.extend(await subscription.next(0.05))
    return got


@pytest.fixture
async def feed(pool: asyncpg.Pool) -> AsyncIterator[Feed]:
    feed = Feed(pool, poll_interval_s=0.02, heartbeat_s=0.2)
    task = asyncio.create_task(feed.run())
    yield feed
    feed.close()
    await task


async def test_a_subscription_falling_behind_reads_the_table_and_misses_nothing(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_module, "MAX_QUEUED", 50)
    feed = Feed(pool, poll_interval_s=0.02, heartbeat_s=0.2)  # read by hand: run_once
    assert await feed.run_once() == 0  # where the feed starts
    async with (
        feed.subscribe(EventFilter(type="t")) as everything,
        feed.subscribe(EventFilter(type="other")) as nothing,
    ):
        created = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t")] * 300)]
        # Read before anyone takes them: more than MAX_QUEUED wait.
        assert await feed.run_once() == 300
        assert everything.behind
        more = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t")] * 10)]
        got = await everything.next(0.1)  # the table's, up to where the feed was
        assert [e.job_id for e in got] == created
        assert await feed.run_once() == 10
        got.extend(await everything.next(0.1))  # then the feed's
        created += more
        assert [e.job_id for e in got] == created
        assert len({e.position for e in got}) == 310
        assert await nothing.next(0.1) == []
    assert feed.listeners == 0


async def test_a_subscription_resumes_from_the_table_and_the_feed_without_a_seam(
    pool: asyncpg.Pool, feed: Feed
) -> None:
    first = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t", queue="a")] * 5)]
    async with feed.subscribe(EventFilter(queue="a")) as live:
        seen = await collect(live, 0)
        assert seen == []  # from now on only
        second = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t", queue="a")] * 5)]
        got = await collect(live, 5)
        assert [e.job_id for e in got] == second
    # Resumed from the first event: the rest of the first batch from the table,
    # then the second, each once.
    [head] = await events.for_job(pool, first[0])
    async with feed.subscribe(EventFilter(queue="a"), after=head.position) as resumed:
        third = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t", queue="a")] * 5)]
        got = await collect(resumed, 14)
        assert [e.job_id for e in got] == first[1:] + second + third
        assert await resumed.next(0.1) == []


# --- over HTTP --------------------------------------------------------------------------


async def test_get_job_events_over_http(api: Api, pool: asyncpg.Pool) -> None:
    status, job, _ = await api.request("POST", "/api/v1/jobs", json={"type": "t"})
    assert status == 201
    await run_through(pool, job["id"])
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{job['id']}/events")
    assert status == 200
    assert [(e["from"], e["to"], e["attempt"]) for e in body["events"]] == [
        (None, "PENDING", 0),
        ("PENDING", "RUNNING", 1),
        ("RUNNING", "SUCCEEDED", 1),
    ]
    assert body["events"][1]["by"] == f"worker:{WORKER}"
    assert body["events"][0]["job_id"] == job["id"]
    assert body["events"][0]["at"] == job["created_at"]
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{ids.new_id()}/events")
    assert status == 404
    assert "not found" in body["error"]


class Stream:
    """A client of GET /api/v1/events: its events, ids and heartbeats as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.heartbeats = 0

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        event_id, data = None, None
        async with asyncio.timeout(10):
            while True:
                line = (await self.response.content.readline()).decode()
                assert line, "the stream ended"
                line = line.rstrip("\n")
                if line == ": heartbeat":
                    self.heartbeats += 1
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = orjson.loads(line[6:])
                elif line == "" and data is not None:
                    assert event_id is not None
                    return event_id, data

    async def events(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        return [await self.next_event() for _ in range(n)]


async def open_stream(
    api: Api, query: str = "", headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, Stream]:
    response = await api.http.get(f"{api.url}/api/v1/events{query}", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    assert await response.content.readline() == b": subscribed\n"
    return response, Stream(response)


async def test_the_stream_filters_and_resumes_after_last_event_id(
    api: Api, pool: asyncpg.Pool
) -> None:
    response, stream = await open_stream(api, "?queue=a&type=t")
    try:
        mine = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t", queue="a")] * 3)]
        await db.insert_many(pool, [NewJob(type="t", queue="b"), NewJob(type="u", queue="a")])
        got = await stream.events(3)
        assert [data["job_id"] for _, data in got] == mine
        assert {(d["from"], d["to"], d["queue"], d["type"]) for _, d in got} == {
            (None, "PENDING", "a", "t")
        }
        await run_through(pool, mine[0])
        moves = await stream.events(2)
        assert [(d["from"], d["to"]) for _, d in moves] == [
            ("PENDING", "RUNNING"),
            ("RUNNING", "SUCCEEDED"),
        ]
    finally:
        response.close()
    # Away for a while; then back with the id of the last event seen.
    last_seen = got[-1][0]
    more = [j.id for j, _ in await db.insert_many(pool, [NewJob(type="t", queue="a")] * 2)]
    response, stream = await open_stream(api, "?queue=a&type=t", {"Last-Event-ID": last_seen})
    try:
        again = await stream.events(4)
        assert [d["job_id"] for _, d in again] == [mine[0], mine[0], *more]
        assert [i for i, _ in again] == [i for i, _ in moves] + [i for i, _ in again[2:]]
    finally:
        response.close()


async def test_a_quiet_stream_sends_heartbeats(settings: Settings, pool: asyncpg.Pool) -> None:
    quick = dataclasses.replace(
        settings, api=dataclasses.replace(settings.api, events_heartbeat_s=0.1)
    )
    app = build_app(quick, pool)
    async with (
        served(app) as url,
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/events?job_id={ids.new_id()}") as response,
    ):
        lines: list[bytes] = []
        async with asyncio.timeout(5):
            while lines.count(b": heartbeat\n") < 3:
                lines.append(await response.content.readline())
        assert b"data" not in b"".join(lines)


@pytest.mark.parametrize(
    ("query", "headers", "problem"),
    [
        ("?state=RUNNING", {}, "unknown query parameter(s): state"),
        ("?job_id=nope", {}, "job_id must be a job id"),
        ("?queue=a.b", {}, "queue"),
        ("", {"Last-Event-ID": "yesterday"}, "Last-Event-ID must be an event id"),
        ("?last_event_id=1-", {}, "Last-Event-ID must be an event id"),
    ],
)
async def test_bad_stream_requests_are_400(
    api: Api, query: str, headers: dict[str, str], problem: str
) -> None:
    status, body, _ = await api.request("GET", f"/api/v1/events{query}", headers=headers)
    assert status == 400
    assert problem in body["error"]


async def test_get_with_wait_answers_when_the_job_finishes(api: Api, pool: asyncpg.Pool) -> None:
    status, job, _ = await api.request("POST", "/api/v1/jobs", json={"type": "t"})

    async def finish_soon() -> None:
        await asyncio.sleep(0.5)
        await run_through(pool, job["id"])

    finishing = asyncio.create_task(finish_soon())
    started = time.monotonic()
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{job['id']}?wait=30s")
    took = time.monotonic() - started
    await finishing
    assert (status, body["state"]) == (200, "SUCCEEDED")
    assert 0.4 < took < 20, took  # answered by the finish, not by the timeout

    # Already finished: at once.
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{job['id']}?wait=30")
    assert (status, body["state"]) == (200, "SUCCEEDED")


async def test_get_with_wait_answers_at_the_timeout_with_the_state_then(
    api: Api, pool: asyncpg.Pool
) -> None:
    status, job, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "run_at": "2999-01-01T00:00:00Z"}
    )
    started = time.monotonic()
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{job['id']}?wait=300ms")
    took = time.monotonic() - started
    assert (status, body["state"]) == (200, "PENDING")
    assert took >= 0.3, took
    for bad in ("-1", "soon", "nan", "1h", "1e2", "", " 1"):
        status, body, _ = await api.request("GET", f"/api/v1/jobs/{job['id']}?wait={bad}")
        assert status == 400, bad
        assert "wait must be a duration" in body["error"], bad
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{ids.new_id()}?wait=1s")
    assert status == 404
