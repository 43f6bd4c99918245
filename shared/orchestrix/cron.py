"""Cron expressions in a time zone: which ticks a schedule has, and when.

The expressions are croniter's: five fields (minute hour day month weekday), or
six with seconds first (``*/5 * * * * *``: every five seconds). Ticks are
computed in the schedule's IANA time zone and stored as UTC instants.

Daylight-saving changes, by the rule that a tick is named by its local wall time
and each local time fires at most once:

- a local time that does not exist (the hour skipped in spring) fires at the
  first moment after the gap: ``30 2 * * *`` in Europe/Berlin fires at 03:00 on
  the day clocks go from 02:00 to 03:00;
- a local time that happens twice (the hour repeated in autumn) fires once, at
  its first occurrence: ``30 2 * * *`` fires once that night, and an hourly
  schedule fires at 02:00 once, so two of its ticks are two hours apart.
  A schedule in UTC has neither case.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterError, croniter

# A cron expression's length, and how far ahead a schedule's next tick is looked
# for (an expression such as "0 0 30 2 *" never fires: it is refused).
MAX_EXPRESSION_CHARS = 256
_SEARCH_YEARS = 10


class InvalidCron(ValueError):
    """The expression or the time zone cannot make a schedule; the message says why."""


@dataclass(frozen=True)
class Cron:
    expression: str
    zone: ZoneInfo

    @classmethod
    def parse(cls, expression: str, timezone: str) -> Cron:
        """A valid expression in a known IANA zone, or :class:`InvalidCron`."""
        if not isinstance(expression, str) or not expression.strip():
            raise InvalidCron("cron must be a non-empty string")
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise InvalidCron(f"cron must be at most {MAX_EXPRESSION_CHARS} characters")
        fields = expression.split()
        if len(fields) not in (5, 6):
            raise InvalidCron(
                "cron must have 5 fields (minute hour day month weekday) "
                f"or 6 with seconds first, got {len(fields)}"
            )
        zone = _zone(timezone)
        try:
            croniter(expression, datetime.now(UTC), second_at_beginning=True)
        except (CroniterError, ValueError, KeyError) as exc:
            raise InvalidCron(f"cron {expression!r} is not valid: {exc}") from None
        cron = cls(" ".join(fields), zone)
        if cron.next_after(datetime.now(UTC)) is None:
            raise InvalidCron(f"cron {expression!r} never fires")
        return cron

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick after ``moment`` (UTC), None if none comes within 10 years."""
        return next(self.ticks_after(moment), None)

    def ticks_after(self, moment: datetime) -> Iterator[datetime]:
        """Ticks after ``moment``, in order, as UTC instants; each local wall time once."""
        local = moment.astimezone(self.zone)
        it = croniter(self.expression, local, second_at_beginning=True)
        horizon = local.year + _SEARCH_YEARS
        last_wall = local.replace(tzinfo=None)
        while True:
            try:
                tick: datetime = it.get_next(datetime)
            except CroniterError:
                return
            if tick.year > horizon:
                return
            wall = tick.replace(tzinfo=None)
            if wall <= last_wall:  # the repeated hour: this local time has fired
                continue
            last_wall = wall
            yield tick.astimezone(UTC)

    def next_ticks(self, moment: datetime, count: int) -> list[datetime]:
        ticks = []
        for tick in self.ticks_after(moment):
            ticks.append(tick)
            if len(ticks) == count:
                break
        return ticks


def _zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or name not in _zones():
        raise InvalidCron(
            f"timezone must be an IANA time zone name such as Europe/Berlin or UTC, got {name!r}"
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidCron(f"timezone {name!r} is not known here") from None


@functools.cache
def _zones() -> frozenset[str]:
    # Only names from the zone database: ZoneInfo would also open a path.
    return frozenset(available_timezones()) | {"UTC"}
