"""Every query on the ``schedules`` table, and the insert of a tick's job.

Firing is one transaction per batch of due schedules: lock them (``FOR UPDATE
SKIP LOCKED``, so schedulers never fire the same schedule at once and never wait
for each other), insert each tick's job, and move ``next_tick_at`` on. The
unique index on ``jobs (schedule, tick_at)`` makes a tick's second job
impossible even if two transactions ever tried.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix import ids
from orchestrix.db.events import recorded
from orchestrix.models import rfc3339

Conn = Any

# What a schedule's job template may hold: the fields of a job a create takes,
# but run_at (a tick's job is due when it fires) and idempotency_key (the tick is
# the key).
TEMPLATE_FIELDS = frozenset(
    {
        "type",
        "payload",
        "queue",
        "priority",
        "max_attempts",
        "timeout_seconds",
        "concurrency_key",
        "rate_limit",
    }
)
# Fields added to templates later: a template stored before them has them unset.
_LATER_FIELDS = {"concurrency_key": None, "rate_limit": None}


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    timezone: str
    job: Mapping[str, Any]
    missed: str  # "skip" or "run_once"
    catch_up_seconds: int
    overlap: str  # "allow" or "skip"
    paused: bool
    next_tick_at: datetime | None
    last_tick_at: datetime | None
    last_job_id: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Schedule:
        fields = {name: row[name] for name in cls.__dataclass_fields__}
        fields["job"] = {**_LATER_FIELDS, **fields["job"]}
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cron": self.cron,
            "timezone": self.timezone,
            "job": dict(self.job),
            "missed": self.missed,
            "catch_up_seconds": self.catch_up_seconds,
            "overlap": self.overlap,
            "paused": self.paused,
            "next_tick_at": rfc3339(self.next_tick_at),
            "last_tick_at": rfc3339(self.last_tick_at),
            "last_job_id": self.last_job_id,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }


_COLUMNS = ("cron", "timezone", "job", "missed", "catch_up_seconds", "overlap", "paused")

_CREATE = """
INSERT INTO schedules (name, cron, timezone, job, missed, catch_up_seconds, overlap, paused,
                       next_tick_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (name) DO NOTHING
RETURNING *
"""


async def create(
    conn: Conn, name: str, fields: Mapping[str, Any], next_tick_at: datetime | None
) -> Schedule | None:
    """The new schedule; None when one of that name exists."""
    row = await conn.fetchrow(_CREATE, name, *(fields[c] for c in _COLUMNS), next_tick_at)
    return None if row is None else Schedule.from_row(row)


async def get(conn: Conn, name: str, *, lock: bool = False) -> Schedule | None:
    sql = "SELECT * FROM schedules WHERE name = $1" + (" FOR UPDATE" if lock else "")
    row = await conn.fetchrow(sql, name)
    return None if row is None else Schedule.from_row(row)


async def list_all(conn: Conn) -> list[Schedule]:
    return [
        Schedule.from_row(row) for row in await conn.fetch("SELECT * FROM schedules ORDER BY name")
    ]


async def replace(
    conn: Conn, name: str, fields: Mapping[str, Any], next_tick_at: datetime | None
) -> Schedule:
    """Write every field of a schedule locked with ``get(lock=True)``."""
    row = await conn.fetchrow(
        """UPDATE schedules SET cron = $2, timezone = $3, job = $4, missed = $5,
               catch_up_seconds = $6, overlap = $7, paused = $8, next_tick_at = $9,
               updated_at = now()
           WHERE name = $1 RETURNING *""",
        name,
        *(fields[c] for c in _COLUMNS),
        next_tick_at,
    )
    return Schedule.from_row(row)


async def delete(conn: Conn, name: str) -> Schedule | None:
    row = await conn.fetchrow("DELETE FROM schedules WHERE name = $1 RETURNING *", name)
    return None if row is None else Schedule.from_row(row)


# --- firing: in the schedulers ----------------------------------------------------

_DUE = """
SELECT *, now() AS now FROM schedules
WHERE NOT paused AND next_tick_at <= now()
ORDER BY next_tick_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

_UNFINISHED = """
SELECT EXISTS (
    SELECT 1 FROM jobs WHERE id = $1 AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
)
"""

# Its creation event names the schedule.
_INSERT_TICK = f"""
WITH created AS (
    INSERT INTO jobs (id, type, queue, payload, priority, max_attempts, timeout_seconds,
                      schedule, tick_at, concurrency_key, rate_limit)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (schedule, tick_at) WHERE schedule IS NOT NULL DO NOTHING
    RETURNING *
), {recorded("created", from_state="NULL::text", actor="'schedule:' || schedule")}
SELECT id FROM created
"""

_ADVANCE = """
UPDATE schedules
SET next_tick_at = $2, last_tick_at = coalesce($3, last_tick_at),
    last_job_id = coalesce($4, last_job_id), updated_at = now()
WHERE name = $1
"""


async def due(conn: Conn, limit: int) -> tuple[list[Schedule], datetime | None]:
    """Due schedules, locked until the transaction ends, and the database's now()."""
    rows = await conn.fetch(_DUE, limit)
    return [Schedule.from_row(row) for row in rows], (rows[0]["now"] if rows else None)


async def unfinished(conn: Conn, job_id: str | None) -> bool:
    """Whether the job ``job_id`` exists and has not finished."""
    return job_id is not None and bool(await conn.fetchval(_UNFINISHED, job_id))


async def insert_tick(conn: Conn, schedule: Schedule, tick_at: datetime) -> str | None:
    """The tick's job, created from the template; None if the tick has one already."""
    job = schedule.job
    job_id: str | None = await conn.fetchval(
        _INSERT_TICK,
        ids.new_id(),
        job["type"],
        job["queue"],
        job["payload"],
        job["priority"],
        job["max_attempts"],
        job["timeout_seconds"],
        schedule.name,
        tick_at,
        job["concurrency_key"],
        job["rate_limit"],
    )
    return job_id


async def advance(
    conn: Conn,
    name: str,
    next_tick_at: datetime | None,
    last_tick_at: datetime | None,
    last_job_id: str | None,
) -> None:
    await conn.execute(_ADVANCE, name, next_tick_at, last_tick_at, last_job_id)
