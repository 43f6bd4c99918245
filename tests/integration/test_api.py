"""Every endpoint and every error case, over real HTTP against a real database."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import nats
import orjson
import pytest
from nats.aio.msg import Msg
from orchestrix import broker, ids
from orchestrix.models import NewJob, rfc3339
from orchestrix.services.api.app import build_app
from orchestrix.services.api.creator import Creator
from orchestrix.services.api.keys import LIFECYCLE, METRICS, POOL
from orchestrix.settings import Settings

from tests.conftest import Api, free_port, served

JSON = {"Content-Type": "application/json"}


async def create(api: Api, **fields: Any) -> dict[str, Any]:
    status, body, _ = await api.request("POST", "/api/v1/jobs", json={"type": "demo_job", **fields})
    assert status == 201, body
    return dict(body)


def served_by_workers(api: Api, types: list[str], queues: list[str]) -> None:
    """As if live workers had registered executors for ``types`` in ``queues``: the API
    labels only such types and queues (tests/integration/test_label_values.py)."""
    api.app[METRICS].known.learn(types, queues)


async def count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM jobs"))


async def test_create_answers_201_with_the_job(api: Api, pool: asyncpg.Pool) -> None:
    body = await create(api, payload={"message": "hello world"})
    assert ids.is_valid(body["id"])
    assert body["type"] == "demo_job"
    assert body["state"] == "PENDING"
    assert body["payload"] == {"message": "hello world"}
    assert body["queue"] == "default"
    assert body["priority"] == 0
    assert body["attempt"] == 0
    assert body["max_attempts"] == 3
    assert body["timeout_seconds"] == 300
    assert body["idempotency_key"] is None
    assert body["result"] is None
    assert body["errors"] == []
    created = datetime.fromisoformat(body["created_at"])
    assert abs(created - datetime.now(UTC)) < timedelta(seconds=5)
    assert body["run_at"] == body["created_at"]
    assert body["started_at"] is None
    assert await count(pool) == 1


async def test_create_with_every_field(api: Api) -> None:
    run_at = "2030-01-02T03:04:05.678901Z"
    body = await create(
        api,
        payload={"n": [1, 2.5, None, True]},
        queue="emails",
        priority=10,
        max_attempts=5,
        run_at=run_at,
        timeout_seconds=60,
        idempotency_key="order-42",
    )
    assert (body["queue"], body["priority"], body["max_attempts"]) == ("emails", 10, 5)
    assert (body["timeout_seconds"], body["idempotency_key"]) == (60, "order-42")
    assert body["run_at"] == run_at
    assert body["payload"] == {"n": [1, 2.5, None, True]}


async def test_run_at_with_an_offset_is_stored_in_utc(api: Api) -> None:
    body = await create(api, run_at="2030-01-01T05:00:00+02:00")
    assert body["run_at"] == "2030-01-01T03:00:00.000000Z"


async def test_idempotency_key_returns_the_first_job(api: Api, pool: asyncpg.Pool) -> None:
    first = await create(api, idempotency_key="once", payload={"v": 1})
    status, again, _ = await api.request(
        "POST",
        "/api/v1/jobs",
        json={"type": "demo_job", "idempotency_key": "once", "payload": {"v": 2}},
    )
    assert status == 200
    assert again == first
    assert await count(pool) == 1


async def test_concurrent_creates_are_inserted_together_each_with_its_own_job(
    api: Api, pool: asyncpg.Pool
) -> None:
    served_by_workers(api, ["demo_job"], ["default", "emails"])
    answers = await asyncio.gather(
        *(
            api.request("POST", "/api/v1/jobs", json={"type": "demo_job", "payload": {"i": i}})
            for i in range(50)
        )
    )
    assert [status for status, _, _ in answers] == [201] * 50
    bodies = [body for _, body, _ in answers]
    assert [body["payload"] for body in bodies] == [{"i": i} for i in range(50)]
    assert len({body["id"] for body in bodies}) == 50
    assert await count(pool) == 50
    # One statement, one now(): jobs inserted together share their created_at.
    assert len({body["created_at"] for body in bodies}) < 50
    for body in bodies[:3]:
        assert (await api.request("GET", f"/api/v1/jobs/{body['id']}"))[1] == body
    _, text, _ = await api.request("GET", "/metrics")
    assert 'orchestrix_jobs_created_total{queue="default",type="demo_job"} 50.0' in text


async def test_concurrent_creates_with_one_idempotency_key_make_one_job(
    api: Api, pool: asyncpg.Pool
) -> None:
    served_by_workers(api, ["demo_job"], ["default", "emails"])
    answers = await asyncio.gather(
        *(
            api.request(
                "POST",
                "/api/v1/jobs",
                json={"type": "demo_job", "idempotency_key": "shared", "payload": {"i": i}},
            )
            for i in range(20)
        ),
        *(
            api.request("POST", "/api/v1/jobs", json={"type": "demo_job", "payload": {"own": i}})
            for i in range(10)
        ),
    )
    shared, own = answers[:20], answers[20:]
    statuses = sorted(status for status, _, _ in shared)
    assert statuses == [200] * 19 + [201]
    first = next(body for status, body, _ in shared if status == 201)
    assert all(body == first for _, body, _ in shared)
    assert [status for status, _, _ in own] == [201] * 10
    assert [body["payload"] for _, body, _ in own] == [{"own": i} for i in range(10)]
    assert await count(pool) == 11
    _, text, _ = await api.request("GET", "/metrics")
    assert 'orchestrix_jobs_created_total{queue="default",type="demo_job"} 11.0' in text


async def test_a_row_postgres_refuses_fails_only_its_own_create(pool: asyncpg.Pool) -> None:
    # The API refuses U+0000 before it gets here; past that check, jsonb refuses it
    # and the whole statement fails: the others must still be created, alone.
    creator = Creator(pool)
    news = [NewJob(type="t", payload={"i": i}, idempotency_key=f"k{i % 3}") for i in range(6)]
    bad = NewJob(type="t", payload={"text": "a\x00b"})
    results = await asyncio.gather(
        *(creator.create(new) for new in news[:3]),
        creator.create(bad),
        *(creator.create(new) for new in news[3:]),
        return_exceptions=True,
    )
    assert isinstance(results.pop(3), asyncpg.DataError)
    good = [result for result in results if not isinstance(result, BaseException)]
    assert len(good) == 6
    jobs = [job for job, _ in good]
    assert [created for _, created in good] == [True] * 3 + [False] * 3
    assert [job.payload for job in jobs] == [{"i": i % 3} for i in range(6)]
    assert jobs[3:] == jobs[:3]
    assert await count(pool) == 3


async def test_creates_while_the_database_is_away_are_503(settings: Settings) -> None:
    dead = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    app = build_app(settings, dead)
    try:
        async with served(app) as url, aiohttp.ClientSession() as http:

            async def create_one() -> tuple[int, Any]:
                async with http.post(f"{url}/api/v1/jobs", json={"type": "t"}) as response:
                    return response.status, await response.json()

            answers = await asyncio.gather(*(create_one() for _ in range(10)))
    finally:
        await dead.close()
    assert answers == [(503, {"error": "the database is unavailable; retry later"})] * 10


async def test_unicode_and_sql_looking_input_round_trips(api: Api) -> None:
    payload = {"q": "'; DROP TABLE jobs; --", "emoji": "ß漢字🙂", "nested": {"a\u00e9": ["\u2028"]}}
    body = await create(api, payload=payload, idempotency_key="ключ 🙂 ' OR 1=1")
    status, fetched, _ = await api.request("GET", f"/api/v1/jobs/{body['id']}")
    assert status == 200
    assert fetched["payload"] == payload
    assert fetched["idempotency_key"] == "ключ 🙂 ' OR 1=1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "type is required"),
        ({"type": ""}, "type must be a string"),
        ({"type": 5}, "type must be a string"),
        ({"type": "has space"}, "type must be a string"),
        ({"type": "x" * 129}, "type must be a string"),
        ({"type": "t", "payload": [1]}, "payload must be a JSON object"),
        ({"type": "t", "payload": "text"}, "payload must be a JSON object"),
        ({"type": "t", "payload": {"a": "\u0000"}}, "U+0000"),
        ({"type": "t", "payload": {"\u0000": 1}}, "U+0000"),
        ({"type": "t", "colour": "red"}, "unknown field(s): colour"),
        ({"type": "t", "queue": "a.b"}, "queue must be a string"),
        ({"type": "t", "queue": ""}, "queue must be a string"),
        ({"type": "t", "priority": 1.5}, "priority must be an integer from -1000 to 1000"),
        ({"type": "t", "priority": 1001}, "priority must be an integer"),
        ({"type": "t", "priority": True}, "priority must be an integer"),
        ({"type": "t", "max_attempts": 0}, "max_attempts must be an integer from 1 to 100"),
        ({"type": "t", "max_attempts": "3"}, "max_attempts must be an integer"),
        ({"type": "t", "timeout_seconds": 0}, "timeout_seconds must be an integer"),
        ({"type": "t", "run_at": "tomorrow"}, "run_at must be an RFC 3339 time"),
        ({"type": "t", "run_at": "2030-01-01T00:00:00"}, "run_at must be an RFC 3339 time"),
        ({"type": "t", "run_at": "2030-13-01T00:00:00Z"}, "run_at is not a valid date"),
        ({"type": "t", "run_at": 1700000000}, "run_at must be an RFC 3339 time"),
        ({"type": "t", "idempotency_key": ""}, "idempotency_key must be a string"),
        ({"type": "t", "idempotency_key": "a\nb"}, "idempotency_key must be a string"),
        ({"type": "t", "idempotency_key": "k" * 256}, "idempotency_key must be a string"),
    ],
)
async def test_invalid_create_is_400_and_writes_nothing(
    api: Api, pool: asyncpg.Pool, body: dict[str, Any], message: str
) -> None:
    status, answer, response = await api.request("POST", "/api/v1/jobs", json=body)
    assert status == 400
    assert response.content_type == "application/json"
    assert message in answer["error"]
    assert await count(pool) == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"", "invalid JSON"),
        (b'{"type": NaN}', "invalid JSON"),
        (b"[]", "the body must be a JSON object"),
        (b'"job"', "the body must be a JSON object"),
        (b'{"type": "t", "payload": {"n": 1e999}}', "invalid JSON"),
    ],
)
async def test_malformed_json_is_400(
    api: Api, pool: asyncpg.Pool, data: bytes, message: str
) -> None:
    status, answer, _ = await api.request("POST", "/api/v1/jobs", data=data, headers=JSON)
    assert status == 400
    assert message in answer["error"]
    assert await count(pool) == 0


async def test_not_json_is_415(api: Api, pool: asyncpg.Pool) -> None:
    status, answer, _ = await api.request(
        "POST", "/api/v1/jobs", data=b'{"type": "t"}', headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    assert answer == {"error": "Content-Type must be application/json"}
    assert await count(pool) == 0


async def test_body_over_the_limit_is_413(api: Api, pool: asyncpg.Pool) -> None:
    big = orjson.dumps({"type": "t", "payload": {"blob": "x" * (1024 * 1024)}})
    status, answer, _ = await api.request(
        "POST", "/api/v1/jobs", data=io.BytesIO(big), headers=JSON
    )
    assert status == 413
    assert answer == {"error": "request body is larger than the limit of 1048576 bytes"}
    assert await count(pool) == 0


async def test_get_returns_every_field_or_404(api: Api) -> None:
    job = await create(api)
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{job['id']}")
    assert (status, body) == (200, job)

    unknown = ids.new_id()
    status, body, _ = await api.request("GET", f"/api/v1/jobs/{unknown}")
    assert (status, body) == (404, {"error": f"job {unknown} not found"})
    status, body, _ = await api.request("GET", "/api/v1/jobs/not-an-id")
    assert (status, body) == (404, {"error": "job not-an-id not found"})


async def test_list_is_newest_first_with_keyset_pages(api: Api) -> None:
    made = [(await create(api, payload={"i": i}))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, body, _ = await api.request("GET", "/api/v1/jobs" + query)
        assert status == 200
        seen += [job["id"] for job in body["jobs"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    assert pages == 3

    status, body, _ = await api.request("GET", "/api/v1/jobs")
    assert len(body["jobs"]) == 5
    assert body["next_cursor"] is None


async def test_list_filters(api: Api, pool: asyncpg.Pool) -> None:
    a = await create(api, queue="emails")
    b = await create(api)
    c = (await api.request("POST", "/api/v1/jobs", json={"type": "other"}))[1]
    await api.request("DELETE", f"/api/v1/jobs/{b['id']}")

    async def listed(query: str) -> list[str]:
        status, body, _ = await api.request("GET", "/api/v1/jobs?" + query)
        assert status == 200, body
        return [job["id"] for job in body["jobs"]]

    assert await listed("state=CANCELLED") == [b["id"]]
    assert await listed("state=pending") == [c["id"], a["id"]]
    assert await listed("type=other") == [c["id"]]
    assert await listed("queue=emails") == [a["id"]]
    assert await listed("state=PENDING&type=demo_job&queue=emails") == [a["id"]]
    assert await listed("state=SUCCEEDED") == []


async def test_every_filter_combination_pages_through_exactly_its_jobs(api: Api) -> None:
    made = []
    for i in range(24):
        job = await create(api, type=f"t{i % 2}", queue=f"q{i // 2 % 3}")
        if i % 4 == 0:
            await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
            job["state"] = "CANCELLED"
        made.append(job)
    newest_first = list(reversed(made))
    for state, job_type, queue in itertools.product(
        (None, "PENDING", "CANCELLED"), (None, "t0", "t1", "t9"), (None, "q0", "q2")
    ):
        given = {"state": state, "type": job_type, "queue": queue}
        filters = "&".join(f"{name}={value}" for name, value in given.items() if value)
        expected = [
            job["id"]
            for job in newest_first
            if all(value is None or job[name] == value for name, value in given.items())
        ]
        seen: list[str] = []
        cursor = None
        while True:
            query = f"?limit=3&{filters}" + (f"&cursor={cursor}" if cursor else "")
            status, body, _ = await api.request("GET", "/api/v1/jobs" + query)
            assert status == 200, body
            seen += [job["id"] for job in body["jobs"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, filters


async def test_a_list_leaves_large_fields_out_unless_included(api: Api, pool: asyncpg.Pool) -> None:
    job = await create(api, payload={"big": "x" * 1000})
    await pool.execute(
        "UPDATE jobs SET result = '{\"r\": 1}', progress = '[1]' WHERE id = $1", job["id"]
    )
    large = {"payload", "result", "errors", "progress"}
    status, body, _ = await api.request("GET", "/api/v1/jobs")
    assert status == 200
    (listed,) = body["jobs"]
    assert large.isdisjoint(listed)
    assert listed["id"] == job["id"]
    assert "last_error" in listed
    for include, shown in [
        ("payload", {"payload"}),
        ("result,progress", {"result", "progress"}),
        ("errors,payload,errors", {"errors", "payload"}),
        ("", set()),
    ]:
        status, body, _ = await api.request("GET", f"/api/v1/jobs?include={include}")
        assert status == 200, body
        (listed,) = body["jobs"]
        assert large & set(listed) == shown, include
    status, body, _ = await api.request(
        "GET", "/api/v1/jobs?include=payload,result,errors,progress"
    )
    (listed,) = body["jobs"]
    assert listed["payload"] == {"big": "x" * 1000}
    assert (listed["result"], listed["errors"], listed["progress"]) == ({"r": 1}, [], [1])
    for bad in ("id", "payload,", ",payload", "PAYLOAD", "payload result"):
        status, body, _ = await api.request("GET", "/api/v1/jobs", params={"include": bad})
        assert status == 400, bad
        assert "include must be a comma-separated list of payload" in body["error"]


async def test_a_page_ends_before_the_job_that_would_pass_the_byte_limit(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    limit_bytes = 65_536
    small = dataclasses.replace(
        settings, api=dataclasses.replace(settings.api, list_max_bytes=limit_bytes)
    )
    app = build_app(small, pool)
    async with served(app) as url, aiohttp.ClientSession() as http:
        api = Api(url=url, http=http, app=app)
        made = [(await create(api, payload={"pad": "p" * 20_000, "i": i}))["id"] for i in range(10)]
        huge = (await create(api, payload={"pad": "h" * 100_000}))["id"]
        # Newest first: the job larger than the limit by itself is a page alone.
        pages: list[list[str]] = []
        cursor = None
        while True:
            query = "?include=payload&limit=1000" + (f"&cursor={cursor}" if cursor else "")
            async with http.get(f"{url}/api/v1/jobs{query}") as response:
                raw = await response.read()
                assert response.status == 200
            body = orjson.loads(raw)
            pages.append([job["id"] for job in body["jobs"]])
            assert len(raw) <= limit_bytes or len(body["jobs"]) == 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert pages[0] == [huge]
        assert [len(page) for page in pages] == [1, 3, 3, 3, 1]
        assert [job for page in pages for job in page] == [huge, *reversed(made)]
        # Without the payloads all eleven fit in one page.
        _, body, _ = await api.request("GET", "/api/v1/jobs?limit=1000")
        assert len(body["jobs"]) == 11
        assert body["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("state=LOST", "state must be one of PENDING"),
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("limit=1001", "limit must be an integer from 1 to 1000"),
        ("limit=ten", "limit must be an integer"),
        ("cursor=abc", "cursor must be a job id"),
        ("type=a%20b", "type must be a string"),
        ("queue=a.b", "queue must be a string"),
        ("sort=asc", "unknown query parameter(s): sort"),
    ],
)
async def test_bad_list_query_is_400(api: Api, query: str, message: str) -> None:
    status, body, _ = await api.request("GET", "/api/v1/jobs?" + query)
    assert status == 400
    assert message in body["error"]


@pytest.mark.parametrize("state", ["PENDING", "RETRYING"])
async def test_cancel_a_job_that_has_not_started(api: Api, pool: asyncpg.Pool, state: str) -> None:
    job = await create(api)
    await pool.execute("UPDATE jobs SET state = $2 WHERE id = $1", job["id"], state)
    status, body, _ = await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    assert status == 200
    assert body["state"] == "CANCELLED"
    assert body["completed_at"] is not None
    assert await pool.fetchval("SELECT state FROM jobs WHERE id = $1", job["id"]) == "CANCELLED"


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED", "CANCELLED"])
async def test_cancel_a_finished_job_is_409(api: Api, pool: asyncpg.Pool, state: str) -> None:
    job = await create(api)
    await pool.execute(
        "UPDATE jobs SET state = $2, completed_at = now() WHERE id = $1", job["id"], state
    )
    status, body, _ = await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    assert status == 409
    assert body == {
        "error": f"job {job['id']} is already {state}; only unfinished jobs can be cancelled"
    }
    assert await pool.fetchval("SELECT state FROM jobs WHERE id = $1", job["id"]) == state


async def test_cancel_a_running_job_asks_its_worker_and_answers_202(
    api: Api, pool: asyncpg.Pool, settings: Settings
) -> None:
    job = await create(api)
    await pool.execute("UPDATE jobs SET state = 'RUNNING' WHERE id = $1", job["id"])
    nc = await nats.connect(list(settings.nats.servers))
    heard: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: Msg) -> None:
        await heard.put(message.data)

    await nc.subscribe(broker.cancel_subject(settings.nats), cb=on_message)
    await nc.flush()
    try:
        status, body, _ = await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
        assert status == 202
        assert body["state"] == "RUNNING"
        assert body["cancel_requested_at"] is not None
        assert await asyncio.wait_for(heard.get(), 5) == job["id"].encode()
    finally:
        await nc.close()
    # Asking again is fine and keeps the first request's time.
    status, again, _ = await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    assert status == 202
    assert again["cancel_requested_at"] == body["cancel_requested_at"]


async def test_cancel_unknown_is_404(api: Api) -> None:
    unknown = ids.new_id()
    status, body, _ = await api.request("DELETE", f"/api/v1/jobs/{unknown}")
    assert (status, body) == (404, {"error": f"job {unknown} not found"})


async def test_stats_counts_every_state(api: Api) -> None:
    await create(api)
    await create(api)
    job = await create(api)
    await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    status, body, _ = await api.request("GET", "/api/v1/stats")
    assert status == 200
    assert body == {
        "jobs": {
            "PENDING": 2,
            "WAITING": 0,
            "RUNNING": 0,
            "SUCCEEDED": 0,
            "FAILED": 0,
            "RETRYING": 0,
            "CANCELLED": 1,
        },
        "total": 3,
        # No worker registered: both due jobs wait for one that runs their type.
        "workers": 0,
        "waiting_for_executor": {"total": 2, "types": {"demo_job": 2}},
    }


async def test_stats_reads_the_counts_not_the_jobs(api: Api, database: str) -> None:
    from orchestrix.services.scheduler.counter import CountFolder

    for job_type in ("a", "a", "b"):
        await create(api, type=job_type)
    await CountFolder(api.app[POOL]).run_once()
    later = await create(api, type="b", run_at=rfc3339(datetime.now(UTC) + timedelta(hours=1)))
    await api.request("DELETE", f"/api/v1/jobs/{later['id']}")
    await create(api, type="c", queue="other")  # not folded yet
    # With the jobs table locked against every reader, stats still answers: it
    # never reads it, so its cost does not grow with the number of jobs.
    locker = await asyncpg.connect(database)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            status, body, _ = await asyncio.wait_for(api.request("GET", "/api/v1/stats"), 5)
    finally:
        await locker.close()
    assert status == 200
    assert body["jobs"] == {
        "PENDING": 4,
        "WAITING": 0,
        "RUNNING": 0,
        "SUCCEEDED": 0,
        "FAILED": 0,
        "RETRYING": 0,
        "CANCELLED": 1,
    }
    assert body["total"] == 5
    assert body["waiting_for_executor"] == {"total": 4, "types": {"a": 2, "b": 1, "c": 1}}


async def test_health_and_ready(api: Api) -> None:
    status, body, _ = await api.request("GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    status, body, _ = await api.request("GET", "/ready")
    assert (status, body) == (200, {"status": "ready", "checks": {"postgres": "ok", "nats": "ok"}})
    api.app[LIFECYCLE].draining = True
    status, body, _ = await api.request("GET", "/ready")
    assert status == 503
    assert body["checks"] == {"postgres": "ok", "nats": "ok", "shutdown": "draining"}


async def test_ready_is_503_while_the_database_is_away(settings: Settings) -> None:
    dead = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    app = build_app(settings, dead)
    try:
        async with served(app) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/ready") as response:
                assert response.status == 503
                body = await response.json()
            async with http.get(f"{url}/api/v1/stats") as response:
                assert response.status == 503
                assert await response.json() == {
                    "error": "the database is unavailable; retry later"
                }
            async with http.get(f"{url}/health") as response:
                assert response.status == 200
    finally:
        await dead.close()
    assert body["status"] == "unavailable"
    assert body["checks"]["postgres"].startswith("unavailable: ")
    assert body["checks"]["nats"] == "unavailable: connecting"
    assert body["error"].startswith("postgres unavailable: ")


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    status, body, _ = await api.request("GET", "/api/v1/nothing")
    assert (status, body) == (404, {"error": "no such endpoint: GET /api/v1/nothing"})
    status, body, response = await api.request("PUT", "/api/v1/jobs")
    assert status == 405
    assert "PUT is not allowed" in body["error"]
    assert "POST" in response.headers["Allow"]


async def test_metrics_count_creations_and_requests_by_route(api: Api) -> None:
    served_by_workers(api, ["demo_job"], ["default", "emails"])
    job = await create(api, queue="emails")
    await api.request("GET", f"/api/v1/jobs/{job['id']}")
    await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    await api.request("GET", f"/api/v1/jobs/{ids.new_id()}")
    status, text, _ = await api.request("GET", "/metrics")
    assert status == 200
    assert 'orchestrix_jobs_created_total{queue="emails",type="demo_job"} 1.0' in text
    assert (
        'orchestrix_http_requests_total{method="GET",route="/api/v1/jobs/{id}",status="200"} 1.0'
        in text
    )
    assert (
        'orchestrix_http_requests_total{method="GET",route="/api/v1/jobs/{id}",status="404"} 1.0'
        in text
    )
    assert (
        'orchestrix_http_request_duration_seconds_count{method="POST",route="/api/v1/jobs"}' in text
    )
    assert 'orchestrix_jobs_cancelled_total{queue="emails",type="demo_job"} 1.0' in text
    assert job["id"] not in text
    # A method the HTTP parser knows but no route has is counted as other, not by name.
    status, _, _ = await api.request("PROPFIND", "/api/v1/jobs")
    assert status == 405
    _, text, _ = await api.request("GET", "/metrics")
    assert "PROPFIND" not in text
    assert 'orchestrix_http_requests_total{method="other",' in text


async def test_batch_creates_every_job_in_order(api: Api, pool: asyncpg.Pool) -> None:
    served_by_workers(api, ["demo_job"], ["default", "emails"])
    jobs = [{"type": "demo_job", "payload": {"i": i}, "priority": i % 3} for i in range(1000)]
    jobs[7] |= {"queue": "emails", "run_at": "2030-01-01T00:00:00Z", "idempotency_key": "k7"}
    status, body, _ = await api.request("POST", "/api/v1/jobs/batch", json={"jobs": jobs})
    assert status == 201
    assert body["created"] == 1000
    assert [job["payload"] for job in body["jobs"]] == [{"i": i} for i in range(1000)]
    assert body["jobs"][7]["queue"] == "emails"
    assert body["jobs"][7]["run_at"] == "2030-01-01T00:00:00.000000Z"
    assert {job["state"] for job in body["jobs"]} == {"PENDING"}
    assert await count(pool) == 1000
    status, fetched, _ = await api.request("GET", f"/api/v1/jobs/{body['jobs'][7]['id']}")
    assert fetched == body["jobs"][7]
    _, text, _ = await api.request("GET", "/metrics")
    assert 'orchestrix_jobs_created_total{queue="default",type="demo_job"} 999.0' in text


async def test_batch_returns_earlier_jobs_for_used_idempotency_keys(
    api: Api, pool: asyncpg.Pool
) -> None:
    first = await create(api, idempotency_key="once")
    status, body, _ = await api.request(
        "POST",
        "/api/v1/jobs/batch",
        json={"jobs": [{"type": "t", "idempotency_key": "once"}, {"type": "t"}]},
    )
    assert status == 201
    assert body["created"] == 1
    assert body["jobs"][0] == first
    assert body["jobs"][1]["type"] == "t"
    assert await count(pool) == 2


async def test_a_key_repeated_in_a_batch_is_one_job(api: Api, pool: asyncpg.Pool) -> None:
    jobs = [
        {"type": "t", "idempotency_key": "k", "payload": {"n": 1}},
        {"type": "t"},
        {"type": "t", "idempotency_key": "k", "payload": {"n": 2}},
    ]
    status, body, _ = await api.request("POST", "/api/v1/jobs/batch", json={"jobs": jobs})
    assert status == 201
    assert body["created"] == 2
    assert body["jobs"][2] == body["jobs"][0]
    assert body["jobs"][0]["payload"] == {"n": 1}
    assert await count(pool) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "jobs must be an array of 1 to 1000 jobs"),
        ({"jobs": []}, "jobs must be an array of 1 to 1000 jobs"),
        ({"jobs": [{"type": "t"}] * 1001}, "jobs must be an array of 1 to 1000 jobs"),
        ({"jobs": {"type": "t"}}, "jobs must be an array"),
        ({"jobs": [{"type": "t"}], "extra": 1}, "unknown field(s): extra"),
        ({"jobs": [{"type": "t"}, "x"]}, "jobs[1]: must be a JSON object"),
        (
            {"jobs": [{"type": "t"}, {"type": "t", "priority": 5000}]},
            "jobs[1]: priority must be an integer",
        ),
        ({"jobs": [{"type": "t"}, {}]}, "jobs[1]: type is required"),
    ],
)
async def test_a_bad_batch_is_400_and_writes_nothing(
    api: Api, pool: asyncpg.Pool, body: dict[str, Any], message: str
) -> None:
    status, answer, _ = await api.request("POST", "/api/v1/jobs/batch", json=body)
    assert status == 400
    assert message in answer["error"]
    assert await count(pool) == 0
