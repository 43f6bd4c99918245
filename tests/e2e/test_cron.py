"""Cron exactly once, with real scheduler processes SIGKILLed while they fire.

Three schedulers fire one schedule that ticks every second; one of them is
killed (SIGKILL, at a random moment, so some kills land inside a firing
transaction) and replaced, again and again. Every tick from the first to the
last must have exactly one job: none lost to a kill, none made twice.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from datetime import datetime, timedelta

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import Service, System


async def fire_under_kills(
    system: System, pool: asyncpg.Pool, seconds: float, kills: int
) -> tuple[list[datetime], int]:
    """Run the schedule for ``seconds`` while killing a scheduler ``kills`` times;
    the ticks that got jobs, and how many kills were made."""
    api = system.start("api")
    schedulers: list[Service] = [system.start("scheduler") for _ in range(3)]
    for service in (api, *schedulers):
        await system.ready(service)
    base = f"http://127.0.0.1:{api.port}/api/v1/schedules"
    schedule = {"name": "every-second", "cron": "* * * * * *", "job": {"type": "record"}}
    rng = random.Random()
    async with aiohttp.ClientSession() as http:
        async with http.post(base, json=schedule) as response:
            assert response.status == 201, await response.text()
            first = datetime.fromisoformat((await response.json())["next_tick_at"])
        started = time.monotonic()
        made = 0
        for n in range(kills):
            await asyncio.sleep(
                max(0.0, started + (n + rng.random()) * seconds / kills - time.monotonic())
            )
            victim = schedulers.pop(rng.randrange(len(schedulers)))
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            made += 1
            schedulers.append(system.start("scheduler"))
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
        async with http.patch(f"{base}/every-second", json={"paused": True}) as response:
            assert response.status == 200, await response.text()
            last = datetime.fromisoformat((await response.json())["last_tick_at"])
    rows = await pool.fetch(
        "SELECT tick_at FROM jobs WHERE schedule = 'every-second' ORDER BY tick_at"
    )
    ticks = [row["tick_at"] for row in rows]
    assert ticks[0] == first
    assert ticks[-1] == last
    return ticks, made


def assert_each_tick_once(ticks: list[datetime], at_least: int) -> None:
    expected = [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))]
    missing = sorted(set(expected) - set(ticks))
    assert missing == [], f"ticks without a job: {missing}"
    assert len(ticks) == len(set(ticks)), "a tick has two jobs"
    assert len(ticks) >= at_least
    print(f"\ncron: {len(ticks)} consecutive ticks, each with exactly one job")


@pytest.mark.timeout(90)
async def test_each_tick_has_one_job_while_schedulers_are_killed(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    ticks, kills = await fire_under_kills(make_system(), pool, seconds=15, kills=5)
    assert kills == 5
    assert_each_tick_once(ticks, at_least=14)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_long_run_each_of_120_ticks_has_one_job_while_schedulers_are_killed(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    ticks, kills = await fire_under_kills(make_system(), pool, seconds=130, kills=30)
    assert kills == 30
    assert_each_tick_once(ticks, at_least=120)
