"""Every query on the ``queues`` table, and what the API shows of a queue.

A queue exists once a job names it or once it has been paused. Pausing gives it
a row with ``paused_at`` set; the claim (``db.jobs._CLAIM``) skips the queues
whose row says so, so a pause holds from the next claim of every worker on.
Resuming clears ``paused_at`` and notifies the workers in the same statement.

The counts come from ``job_counts`` and its deltas (``db.counts``), as
``/api/v1/stats``'s do: what they cost does not grow with the jobs table. The
oldest due job of each queue is read from the waiting jobs alone (their partial
claim index), so finished jobs cost it nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix.db import counts as job_counts
from orchestrix.models import rfc3339
from orchestrix.states import JobState

Conn = Any

_PAUSE = """
INSERT INTO queues (name, paused_at) VALUES ($1, now())
ON CONFLICT (name) DO UPDATE
SET paused_at = coalesce(queues.paused_at, excluded.paused_at), updated_at = now()
RETURNING name
"""

# Workers hear the notification (through the schedulers' waker) and claim at once.
_RESUME = """
WITH resumed AS (
    UPDATE queues SET paused_at = NULL, updated_at = now()
    WHERE name = $1 AND paused_at IS NOT NULL
    RETURNING name
)
SELECT name, pg_notify('orchestrix_jobs', '') FROM resumed
"""

# Waiting and due: a paused queue's jobs keep ageing. A run_at of year 1 is stored
# as -infinity (see models.rfc3339): its age is counted from year 1.
_OLDEST_DUE = """
SELECT queue, min(run_at) AS oldest,
       extract(epoch FROM now() - greatest(min(run_at), '0001-01-01T00:00:00Z'))::float8 AS age_s
FROM jobs
WHERE state IN ('PENDING', 'RETRYING') AND run_at <= now() AND ($1::text IS NULL OR queue = $1)
GROUP BY queue
"""

_ROWS = (
    "SELECT name, paused_at, key_limit, running_limit FROM queues"
    " WHERE $1::text IS NULL OR name = $1"
)

# $3 / $5: whether to set key_limit ($2) / running_limit ($4).
_SET_LIMITS = """
INSERT INTO queues (name, key_limit, running_limit)
VALUES ($1, CASE WHEN $3 THEN $2::int END, CASE WHEN $5 THEN $4::int END)
ON CONFLICT (name) DO UPDATE
SET key_limit = CASE WHEN $3 THEN excluded.key_limit ELSE queues.key_limit END,
    running_limit = CASE WHEN $5 THEN excluded.running_limit ELSE queues.running_limit END,
    updated_at = now()
"""


@dataclass(frozen=True)
class Queue:
    name: str
    paused_at: datetime | None
    jobs: dict[JobState, int]
    oldest_due_at: datetime | None  # the oldest due job that waits, if any
    oldest_due_age_s: float | None  # since when it is due, by the database's clock
    key_limit: int | None = None  # jobs of one concurrency key running at once (None: 1)
    running_limit: int | None = None  # the queue's jobs running at once (None: no limit)

    def to_json(self) -> dict[str, Any]:
        age = self.oldest_due_age_s
        return {
            "name": self.name,
            "paused": self.paused_at is not None,
            "paused_at": rfc3339(self.paused_at),
            "jobs": {state.value: n for state, n in self.jobs.items()},
            "total": sum(self.jobs.values()),
            "oldest_due_at": rfc3339(self.oldest_due_at),
            "oldest_due_age_seconds": None if age is None else max(0.0, age),
            "key_limit": self.key_limit,
            "running_limit": self.running_limit,
        }


async def overview(pool: Any, name: str | None = None) -> list[Queue]:
    """Every queue (or only ``name``), by name: those with jobs and those with a row.
    Read in one snapshot, so the counts add up."""
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
        rows = {row["name"]: row for row in await c.fetch(_ROWS, name)}
        counts = await job_counts.by_queue(c, name)
        oldest = {row["queue"]: row for row in await c.fetch(_OLDEST_DUE, name)}
    return [
        Queue(
            name=queue,
            paused_at=rows[queue]["paused_at"] if queue in rows else None,
            key_limit=rows[queue]["key_limit"] if queue in rows else None,
            running_limit=rows[queue]["running_limit"] if queue in rows else None,
            jobs=counts.get(queue, dict.fromkeys(JobState, 0)),
            oldest_due_at=oldest[queue]["oldest"] if queue in oldest else None,
            oldest_due_age_s=oldest[queue]["age_s"] if queue in oldest else None,
        )
        for queue in sorted(rows.keys() | counts.keys())
    ]


async def pause(conn: Conn, name: str) -> None:
    """Pause ``name`` (a queue with no jobs yet too); pausing a paused queue changes nothing."""
    await conn.fetchval(_PAUSE, name)


UNSET = object()  # a limit set_limits leaves as it is


async def set_limits(
    conn: Conn, name: str, *, key_limit: Any = UNSET, running_limit: Any = UNSET
) -> None:
    """How many jobs of one concurrency key of ``name`` may run at once (None: 1),
    and how many of its jobs (None: no limit); a limit not given stays."""
    await conn.execute(
        _SET_LIMITS,
        name,
        None if key_limit is UNSET else key_limit,
        key_limit is not UNSET,
        None if running_limit is UNSET else running_limit,
        running_limit is not UNSET,
    )


async def resume(conn: Conn, name: str) -> bool:
    """Resume ``name`` and wake the workers; False when it was not paused."""
    return await conn.fetchval(_RESUME, name) is not None
