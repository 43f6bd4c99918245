"""Every query on the ``jobs`` table, one named function each.

Functions take a connection (or pool) so the caller owns the transaction. Every
update names the state it expects to move from (see ``orchestrix.states``): zero
rows updated means someone else moved the job first, and the caller must not
overwrite it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrix import ids
from orchestrix.models import Job, NewJob
from orchestrix.states import CANCELLABLE_AT_ONCE, JobState

# asyncpg ships no type information: a Connection or a Pool, both answer fetch*.
Conn = Any

_INSERT = """
INSERT INTO jobs (id, type, queue, payload, priority, max_attempts, run_at,
                  timeout_seconds, idempotency_key)
VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, now()), $8, $9)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *
"""

_BY_ID = "SELECT * FROM jobs WHERE id = $1"

_BY_IDEMPOTENCY_KEY = "SELECT * FROM jobs WHERE idempotency_key = $1"

_CANCEL = """
UPDATE jobs
SET state = 'CANCELLED', completed_at = now(), updated_at = now()
WHERE id = $1 AND state = ANY($2::text[])
RETURNING *
"""

_COUNT_BY_STATE = "SELECT state, count(*) AS n FROM jobs GROUP BY state"


async def insert(conn: Conn, new: NewJob) -> tuple[Job, bool]:
    """Create a job; with an idempotency key already used, return that job instead.

    Returns the job and whether it was created by this call.
    """
    # Two attempts: the first job for a key could be deleted between our
    # conflicting insert and the read that follows it.
    for _ in range(2):
        row = await conn.fetchrow(
            _INSERT,
            ids.new_id(),
            new.type,
            new.queue,
            new.payload,
            new.priority,
            new.max_attempts,
            new.run_at,
            new.timeout_seconds,
            new.idempotency_key,
        )
        if row is not None:
            return Job.from_row(row), True
        existing = await conn.fetchrow(_BY_IDEMPOTENCY_KEY, new.idempotency_key)
        if existing is not None:
            return Job.from_row(existing), False
    raise RuntimeError(f"idempotency key {new.idempotency_key!r} conflicts but has no job")


async def get(conn: Conn, job_id: str) -> Job | None:
    row = await conn.fetchrow(_BY_ID, job_id)
    return None if row is None else Job.from_row(row)


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    type: str | None = None
    queue: str | None = None


@dataclass(frozen=True)
class Page:
    jobs: Sequence[Job]
    next_cursor: str | None


async def list_page(conn: Conn, where: JobFilter, *, limit: int, before: str | None) -> Page:
    """Jobs newest first, ``limit`` at most, with ids below ``before`` (keyset)."""
    # Only the filters given go into the SQL: an `$n IS NULL OR ...` form would
    # leave the planner a generic plan that cannot use the indexes.
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("state", where.state.value if where.state else None),
        ("type", where.type),
        ("queue", where.queue),
    ):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    if before is not None:
        args.append(before)
        clauses.append(f"id < ${len(args)}")
    args.append(limit + 1)
    sql = "SELECT * FROM jobs"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY id DESC LIMIT ${len(args)}"
    rows = await conn.fetch(sql, *args)
    jobs = [Job.from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(jobs=jobs, next_cursor=jobs[-1].id if more else None)


async def cancel(conn: Conn, job_id: str) -> Job | None:
    """Cancel a job that has not started; None when it is gone or past that point."""
    row = await conn.fetchrow(_CANCEL, job_id, [s.value for s in CANCELLABLE_AT_ONCE])
    return None if row is None else Job.from_row(row)


async def count_by_state(conn: Conn) -> dict[JobState, int]:
    counts = dict.fromkeys(JobState, 0)
    for row in await conn.fetch(_COUNT_BY_STATE):
        counts[JobState(row["state"])] = row["n"]
    return counts
