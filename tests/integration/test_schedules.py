"""Cron schedules on a real database: /api/v1/schedules over HTTP, and the firer."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from orchestrix.db import jobs as jobs_db
from orchestrix.db import schedules as db
from orchestrix.executors import JobContext
from orchestrix.metrics import SchedulerMetrics

from services.scheduler.cron import CronFirer
from tests.conftest import Api

TEMPLATE = {
    "type": "report",
    "payload": {"kind": "daily"},
    "queue": "default",
    "priority": 0,
    "max_attempts": 3,
    "timeout_seconds": 300,
    "concurrency_key": None,
    "rate_limit": None,
}


@pytest.fixture
async def clean(pool: asyncpg.Pool) -> asyncpg.Pool:
    await pool.execute("TRUNCATE schedules")
    return pool


async def make(pool: asyncpg.Pool, name: str, next_tick_at: datetime, **fields: Any) -> db.Schedule:
    values = {
        "cron": "* * * * * *",
        "timezone": "UTC",
        "job": TEMPLATE,
        "missed": "skip",
        "catch_up_seconds": 60,
        "overlap": "allow",
        "paused": False,
        **fields,
    }
    made = await db.create(pool, name, values, next_tick_at)
    assert made is not None
    return made


async def ticks_of(pool: asyncpg.Pool, name: str) -> list[datetime]:
    rows = await pool.fetch("SELECT tick_at FROM jobs WHERE schedule = $1 ORDER BY tick_at", name)
    return [row["tick_at"] for row in rows]


async def test_three_firers_at_once_create_each_tick_once(clean: asyncpg.Pool) -> None:
    now = await clean.fetchval("SELECT date_trunc('second', now())")
    await make(clean, "every-second", now - timedelta(seconds=3))
    firers = [CronFirer(clean, SchedulerMetrics()) for _ in range(3)]
    deadline = asyncio.get_running_loop().time() + 2.5
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.gather(*(firer.run_once() for firer in firers))
        await asyncio.sleep(0.05)
    ticks = await ticks_of(clean, "every-second")
    # One job per second from the first due tick on, none twice, none left out.
    assert ticks == [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))]
    assert ticks[0] == now - timedelta(seconds=3)
    assert len(ticks) >= 5
    created = sum(
        firer._metrics.registry.get_sample_value(
            "orchestrix_schedule_ticks_total", {"outcome": "created"}
        )
        or 0
        for firer in firers
    )
    assert created == len(ticks)


async def test_a_tick_job_carries_its_nominal_time_to_the_executor(clean: asyncpg.Pool) -> None:
    # The tick of the last full hour, fired late (within its catch-up window).
    tick = await clean.fetchval("SELECT date_trunc('hour', now()) - interval '1 hour'")
    await make(clean, "nine", tick, cron="0 * * * *", catch_up_seconds=3 * 3600)
    await CronFirer(clean, SchedulerMetrics()).run_once()
    row = await clean.fetchrow(
        "SELECT id FROM jobs WHERE schedule = 'nine' ORDER BY tick_at LIMIT 1"
    )
    job = await jobs_db.get(clean, row["id"])
    assert job is not None
    context = JobContext.of(job)
    assert (context.schedule, context.tick_at) == ("nine", tick)
    assert (job.type, job.payload, job.state.value) == ("report", {"kind": "daily"}, "PENDING")
    assert job.to_json()["tick_at"] == tick.strftime("%Y-%m-%dT%H:00:00.000000Z")


async def test_overlap_skip_creates_nothing_while_the_last_job_runs(clean: asyncpg.Pool) -> None:
    now = await clean.fetchval("SELECT date_trunc('second', now())")
    await make(clean, "no-overlap", now - timedelta(seconds=2), overlap="skip")
    metrics = SchedulerMetrics()
    firer = CronFirer(clean, metrics)
    await firer.run_once()
    # Three ticks were due: the first made a job, the two others overlapped it.
    assert len(await ticks_of(clean, "no-overlap")) == 1
    assert (
        metrics.registry.get_sample_value(
            "orchestrix_schedule_ticks_total", {"outcome": "overlapped"}
        )
        == 2
    )
    await asyncio.sleep(1.1)
    await firer.run_once()
    assert len(await ticks_of(clean, "no-overlap")) == 1
    await clean.execute(
        "UPDATE jobs SET state = 'SUCCEEDED', attempt = 1, started_at = now(),"
        " completed_at = now() WHERE schedule = 'no-overlap'"
    )
    await asyncio.sleep(1.1)
    await firer.run_once()
    assert len(await ticks_of(clean, "no-overlap")) == 2


async def test_missed_ticks_are_skipped_or_run_once(clean: asyncpg.Pool) -> None:
    now = await clean.fetchval("SELECT now()")
    long_ago = now - timedelta(hours=3)
    # Hourly, at the minute half an hour from now: the latest tick is about 30
    # minutes old, never within the 60 s catch-up window (at 05:00:00 an hourly
    # "0 * * * *" tick was, and fired as it should).
    hourly = f"{(now.minute + 30) % 60} * * * *"
    await make(clean, "skips", long_ago, cron=hourly, missed="skip")
    await make(clean, "catches-up", long_ago, cron=hourly, missed="run_once")
    await CronFirer(clean, SchedulerMetrics()).run_once()
    assert await ticks_of(clean, "skips") == []
    [once] = await ticks_of(clean, "catches-up")
    assert now - timedelta(hours=1) <= once <= now  # the latest missed hour
    for name in ("skips", "catches-up"):
        found = await db.get(clean, name)
        assert found is not None
        assert found.next_tick_at is not None
        assert found.next_tick_at > now


async def test_a_paused_schedule_does_not_fire(clean: asyncpg.Pool) -> None:
    await make(clean, "paused", datetime.now(UTC) - timedelta(seconds=1), paused=True)
    assert await CronFirer(clean, SchedulerMetrics()).run_once() == 0
    assert await ticks_of(clean, "paused") == []


# --- over HTTP ---------------------------------------------------------------------


async def test_create_get_list_and_delete(api: Api, clean: asyncpg.Pool) -> None:
    body = {
        "name": "nightly",
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "job": {"type": "report"},
    }
    status, made, _ = await api.request("POST", "/api/v1/schedules", json=body)
    assert status == 201, made
    assert made["job"] == {**TEMPLATE, "payload": {}}
    assert (made["missed"], made["catch_up_seconds"], made["overlap"], made["paused"]) == (
        "skip",
        60,
        "allow",
        False,
    )
    assert len(made["next_runs"]) == 5
    assert made["next_runs"][0] == made["next_tick_at"]
    first = datetime.fromisoformat(made["next_tick_at"])
    assert first.astimezone(datetime.now().astimezone().tzinfo) > datetime.now(UTC)
    status, again, _ = await api.request("POST", "/api/v1/schedules", json=body)
    assert status == 409, again
    status, fetched, _ = await api.request("GET", "/api/v1/schedules/nightly")
    assert (status, fetched["cron"]) == (200, "30 2 * * *")
    status, listed, _ = await api.request("GET", "/api/v1/schedules")
    assert [s["name"] for s in listed["schedules"]] == ["nightly"]
    status, deleted, _ = await api.request("DELETE", "/api/v1/schedules/nightly")
    assert (status, deleted["name"]) == (200, "nightly")
    status, _, _ = await api.request("GET", "/api/v1/schedules/nightly")
    assert status == 404


async def test_patch_pauses_resumes_and_retimes(api: Api, clean: asyncpg.Pool) -> None:
    body = {"name": "hourly", "cron": "0 * * * *", "job": {"type": "report"}}
    status, made, _ = await api.request("POST", "/api/v1/schedules", json=body)
    assert status == 201, made
    status, paused, _ = await api.request(
        "PATCH", "/api/v1/schedules/hourly", json={"paused": True}
    )
    assert status == 200, paused
    assert (paused["paused"], paused["next_tick_at"], paused["next_runs"]) == (True, None, [])
    status, resumed, _ = await api.request(
        "PATCH", "/api/v1/schedules/hourly", json={"paused": False}
    )
    assert (status, resumed["next_tick_at"]) == (200, made["next_tick_at"])
    status, retimed, _ = await api.request(
        "PATCH", "/api/v1/schedules/hourly", json={"cron": "*/5 * * * * *"}
    )
    assert status == 200, retimed
    soon = datetime.fromisoformat(retimed["next_tick_at"])
    assert soon - datetime.now(UTC) <= timedelta(seconds=5)
    # A change of the job alone keeps the next tick.
    status, changed, _ = await api.request(
        "PATCH", "/api/v1/schedules/hourly", json={"job": {"type": "other", "priority": 5}}
    )
    assert status == 200, changed
    assert (changed["job"]["type"], changed["next_tick_at"]) == ("other", retimed["next_tick_at"])
    status, error, _ = await api.request("PATCH", "/api/v1/schedules/hourly", json={"name": "x"})
    assert (status, "cannot be changed" in error["error"]) == (400, True)
    status, _, _ = await api.request("PATCH", "/api/v1/schedules/nobody", json={"paused": True})
    assert status == 404


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cron": "* * *"}, "5 fields"),
        ({"cron": "0 0 31 2 *"}, "never fires"),
        ({"timezone": "Nowhere/City"}, "IANA"),
        ({"missed": "all"}, "missed must be one of"),
        ({"overlap": "queue"}, "overlap must be one of"),
        ({"paused": "yes"}, "paused must be"),
        ({"catch_up_seconds": 0}, "catch_up_seconds"),
        ({"job": {"type": "t", "run_at": "2030-01-01T00:00:00Z"}}, "cannot be set"),
        ({"job": {"type": "t", "idempotency_key": "k"}}, "cannot be set"),
        ({"job": {"type": "bad type"}}, "job: type"),
        ({"job": {"type": "t", "priority": 5000}}, "job: priority"),
        ({"job": []}, "job must be a JSON object"),
        ({"colour": "red"}, "unknown field"),
        ({"name": "has space"}, "name must be"),
    ],
)
async def test_bad_schedules_are_400_and_nothing_is_written(
    api: Api, clean: asyncpg.Pool, change: dict[str, Any], message: str
) -> None:
    body = {"name": "s", "cron": "* * * * *", "job": {"type": "t"}, **change}
    status, error, _ = await api.request("POST", "/api/v1/schedules", json=body)
    assert status == 400, error
    assert message in error["error"]
    assert await clean.fetchval("SELECT count(*) FROM schedules") == 0


async def test_missing_fields_are_400(api: Api, clean: asyncpg.Pool) -> None:
    full = {"name": "s", "cron": "* * * * *", "job": {"type": "t"}}
    for field in full:
        body = {k: v for k, v in full.items() if k != field}
        status, error, _ = await api.request("POST", "/api/v1/schedules", json=body)
        assert (status, error["error"]) == (400, f"{field} is required")
    assert Counter(await clean.fetch("SELECT name FROM schedules")) == Counter()


async def test_a_tick_job_carries_the_templates_key_and_rate_limit(
    api: Api, clean: asyncpg.Pool
) -> None:
    job = {"type": "report", "concurrency_key": "customer-1", "rate_limit": "reports"}
    body = {"name": "limited", "cron": "0 * * * *", "job": job}
    status, refused, _ = await api.request("POST", "/api/v1/schedules", json=body)
    assert status == 422, refused
    assert "reports" in refused["error"]
    status, _, _ = await api.request(
        "POST", "/api/v1/rate-limits", json={"name": "reports", "per_second": 1}
    )
    assert status == 201
    status, made, _ = await api.request("POST", "/api/v1/schedules", json=body)
    assert status == 201, made
    assert (made["job"]["concurrency_key"], made["job"]["rate_limit"]) == ("customer-1", "reports")
    # A template stored before these fields reads them as unset.
    tick = await clean.fetchval("SELECT date_trunc('hour', now()) - interval '1 hour'")
    await make(clean, "older", tick, cron="0 * * * *", catch_up_seconds=3 * 3600)
    await clean.execute(
        "UPDATE schedules SET job = job - 'concurrency_key' - 'rate_limit' WHERE name = 'older'"
    )
    await clean.execute(
        "UPDATE schedules SET next_tick_at = $1, catch_up_seconds = 10800 WHERE name = 'limited'",
        tick,
    )
    await CronFirer(clean, SchedulerMetrics()).run_once()
    rows = await clean.fetch("SELECT schedule, concurrency_key, rate_limit FROM jobs")
    assert {tuple(row) for row in rows} == {
        ("limited", "customer-1", "reports"),
        ("older", None, None),
    }
