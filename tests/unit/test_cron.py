"""Cron expressions in time zones, and which ticks a due schedule fires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from orchestrix.cron import Cron, InvalidCron
from orchestrix.db.schedules import Schedule

from services.scheduler.cron import MAX_TICKS, plan


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_five_fields_and_six_with_seconds_first() -> None:
    every_five_minutes = Cron.parse("*/5 * * * *", "UTC")
    assert every_five_minutes.next_ticks(utc(2026, 1, 1, 0, 1), 2) == [
        utc(2026, 1, 1, 0, 5),
        utc(2026, 1, 1, 0, 10),
    ]
    every_ten_seconds = Cron.parse("*/10 * * * * *", "UTC")
    assert every_ten_seconds.next_ticks(utc(2026, 1, 1, 0, 0, 1), 2) == [
        utc(2026, 1, 1, 0, 0, 10),
        utc(2026, 1, 1, 0, 0, 20),
    ]


def test_ticks_are_computed_in_the_schedules_zone() -> None:
    nine_in_tokyo = Cron.parse("0 9 * * *", "Asia/Tokyo")
    assert nine_in_tokyo.next_after(utc(2026, 6, 1, 12)) == utc(2026, 6, 2, 0)


def test_a_skipped_local_time_fires_after_the_gap() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
    daily = Cron.parse("30 2 * * *", "Europe/Berlin")
    assert daily.next_ticks(utc(2026, 3, 28, 12), 2) == [
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, the first moment after the gap
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    hourly = Cron.parse("0 * * * *", "Europe/Berlin")
    ticks = hourly.next_ticks(utc(2026, 3, 28, 23, 30), 3)
    assert ticks == [utc(2026, 3, 29, 0), utc(2026, 3, 29, 1), utc(2026, 3, 29, 2)]


def test_a_repeated_local_time_fires_once() -> None:
    # Europe/Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC).
    daily = Cron.parse("30 2 * * *", "Europe/Berlin")
    assert daily.next_ticks(utc(2026, 10, 24, 12), 2) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first of the two
        utc(2026, 10, 26, 1, 30),  # the next day, 02:30 CET
    ]
    hourly = Cron.parse("0 * * * *", "Europe/Berlin")
    # 01:00 CEST, 02:00 CEST, then 03:00 CET: the second 02:00 does not fire.
    assert hourly.next_ticks(utc(2026, 10, 24, 22, 30), 3) == [
        utc(2026, 10, 24, 23),
        utc(2026, 10, 25, 0),
        utc(2026, 10, 25, 2),
    ]


@pytest.mark.parametrize(
    ("expression", "zone", "message"),
    [
        ("", "UTC", "non-empty"),
        ("* * * *", "UTC", "5 fields"),
        ("* * * * * * *", "UTC", "5 fields"),
        ("61 * * * *", "UTC", "not valid"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("* * * * *", "Mars/Olympus", "IANA"),
        ("* * * * *", "../../etc/passwd", "IANA"),
        ("* * * * *", "", "IANA"),
    ],
)
def test_what_cannot_make_a_schedule_is_refused(expression: str, zone: str, message: str) -> None:
    with pytest.raises(InvalidCron, match=message):
        Cron.parse(expression, zone)


def schedule(next_tick_at: datetime, *, missed: str = "skip", catch_up: int = 60) -> Schedule:
    now = utc(2026, 1, 1)
    return Schedule(
        name="s",
        cron="* * * * * *",
        timezone="UTC",
        job={},
        missed=missed,
        catch_up_seconds=catch_up,
        overlap="allow",
        paused=False,
        next_tick_at=next_tick_at,
        last_tick_at=None,
        last_job_id=None,
        created_at=now,
        updated_at=now,
    )


EVERY_SECOND = Cron.parse("* * * * * *", "UTC")
NOW = utc(2026, 1, 1, 12, 0, 0)


def test_late_ticks_within_the_window_each_fire() -> None:
    # A failover of 3 s: the three ticks since each get their job.
    result = plan(EVERY_SECOND, schedule(NOW - timedelta(seconds=3)), NOW)
    assert result.fire == [NOW - timedelta(seconds=s) for s in (3, 2, 1, 0)]
    assert result.missed == 0
    assert result.next_tick_at == NOW + timedelta(seconds=1)


def test_ticks_older_than_the_window_are_missed_or_run_once() -> None:
    # Down for 100 s with a window of 10 s: 90 ticks missed, 11 in the window.
    first = NOW - timedelta(seconds=100)
    skipped = plan(EVERY_SECOND, schedule(first, catch_up=10), NOW)
    assert skipped.missed == 90
    assert skipped.fire == [NOW - timedelta(seconds=s) for s in range(10, -1, -1)]
    once = plan(EVERY_SECOND, schedule(first, missed="run_once", catch_up=10), NOW)
    assert once.missed == 89
    # The latest missed tick runs once, then the ones in the window.
    assert once.fire[0] == NOW - timedelta(seconds=11)
    assert once.fire[1:] == skipped.fire
    assert once.next_tick_at == skipped.next_tick_at == NOW + timedelta(seconds=1)


def test_a_round_handles_a_bounded_number_of_ticks() -> None:
    first = NOW - timedelta(seconds=5000)
    result = plan(EVERY_SECOND, schedule(first, catch_up=86400), NOW)
    assert len(result.fire) == MAX_TICKS
    assert result.next_tick_at == first + timedelta(seconds=MAX_TICKS)
