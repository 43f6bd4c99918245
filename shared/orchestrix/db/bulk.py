"""Bulk actions: cancel or retry every job a filter matches, in bounded chunks.

Each chunk is one statement over at most ``CHUNK`` jobs, walked in id order, so
no statement holds many row locks for long: a worker's claim skips the rows a
chunk holds (SKIP LOCKED) instead of waiting, and a chunk that meets a row a
claim holds waits only for that claim's commit. Every update re-checks the
state it moves from (the state table's guard), so a job a worker took meanwhile
is left alone, never moved against the table.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix.db import jobs, workflows
from orchestrix.db.events import SESSION_ACTOR, recorded
from orchestrix.states import CANCELLABLE_AT_ONCE, RETRYABLE_BY_HAND, JobState

Conn = Any
CHUNK = 5_000


@dataclass(frozen=True)
class Selection:
    """Which jobs: a list of ids, and/or filters (all of them must hold)."""

    ids: Sequence[str] | None = None
    states: Sequence[JobState] | None = None
    type: str | None = None
    queue: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def params(self) -> tuple[Any, ...]:
        return (
            None if self.ids is None else list(self.ids),
            None if self.states is None else [s.value for s in self.states],
            self.type,
            self.queue,
            self.created_after,
            self.created_before,
        )


# $1 cursor (the last id seen), $2 ids, $3 states, $4 type, $5 queue,
# $6 created after, $7 created before, $8 chunk size; {sources}: the states it
# moves from. Each chunk's UPDATE finds its rows by primary key, from the array of
# picked ids; its state guard is written `(...) IS TRUE` so that it cannot use
# jobs_state_id_idx. With statistics from before a big change (all PENDING, no
# CANCELLED yet) the planner took that index for 1 row and checked each of the
# 100,000 it found against the 5,000 picked ids: 8.7 s a chunk of a bulk retry.
_MATCH = """
SELECT {columns} FROM jobs
WHERE id > $1 AND state = ANY({sources}::text[])
  AND ($2::text[] IS NULL OR id = ANY($2::text[]))
  AND ($3::text[] IS NULL OR state = ANY($3::text[]))
  AND ($4::text IS NULL OR type = $4) AND ($5::text IS NULL OR queue = $5)
  AND ($6::timestamptz IS NULL OR created_at >= $6)
  AND ($7::timestamptz IS NULL OR created_at < $7)
  {also}
ORDER BY id
LIMIT $8
"""


def _chunk(
    sources: frozenset[JobState],
    set_clause: str,
    moved: str,
    *,
    changes_state: bool = True,
    also: str = "",
) -> str:
    """One chunk of a bulk action: pick the next jobs in ``sources`` the selection
    matches, move them with ``set_clause``; the last id picked, and ``moved``.

    A chunk that changes the jobs' state locks what it picks (FOR UPDATE), so that
    the state it read is the one each event names as the move's start.
    """
    states = ", ".join(f"'{state.value}'" for state in sorted(sources))
    match = _MATCH.format(
        columns="id, state AS from_state, attempt AS from_attempt",
        sources=f"ARRAY[{states}]",
        also=also,
    )
    events = ""
    if changes_state:
        match += "FOR UPDATE\n"
        source = "moved JOIN picked USING (id)"
        events = ", " + recorded(
            source, from_state="from_state", attempt="from_attempt", actor=SESSION_ACTOR
        )
    return f"""
WITH picked AS ({match}),
moved AS (
    UPDATE jobs SET {set_clause}
    WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked)) AND (jobs.state IN ({states})) IS TRUE
    RETURNING jobs.id, jobs.state, jobs.queue, jobs.type, jobs.workflow_id
){events}
SELECT (SELECT max(id) FROM picked) AS last, {moved} AS moved
"""


_COUNT = "(SELECT count(*) FROM moved)"
_CANCEL_CHUNK = _chunk(CANCELLABLE_AT_ONCE, jobs.CANCEL_SET, _COUNT)
# A workflow's jobs are retried one by one (db.workflows.retry): each decides
# its state by its parents, and brings back what its end had cancelled.
_RETRY_CHUNK = _chunk(
    RETRYABLE_BY_HAND, jobs.RETRY_BY_HAND_SET, _COUNT, also="AND workflow_id IS NULL"
)
_WORKFLOW_JOBS_CHUNK = _MATCH.format(
    columns="id", sources="ARRAY['CANCELLED', 'FAILED']", also="AND workflow_id IS NOT NULL"
)
# Running jobs cannot be cancelled by the API itself: their workers are asked.
_REQUEST_CANCEL_CHUNK = _chunk(
    frozenset({JobState.RUNNING}),
    jobs.REQUEST_CANCEL_SET,
    "ARRAY(SELECT id FROM moved)",
    changes_state=False,
)


async def _chunks(pool: Any, sql: str, selection: Selection) -> list[Any]:
    """Run ``sql`` chunk after chunk until the selection is walked; each chunk's ``moved``."""
    results: list[Any] = []
    cursor = ""
    while True:
        row = await pool.fetchrow(sql, cursor, *selection.params(), CHUNK)
        if row["last"] is None:
            return results
        results.append(row["moved"])
        cursor = row["last"]


async def cancel(pool: Any, selection: Selection) -> tuple[int, list[str]]:
    """Cancel the waiting jobs selected, at once; ask for the running ones' cancel.
    How many were cancelled, and the ids of the running jobs asked."""
    cancelled = int(sum(await _chunks(pool, _CANCEL_CHUNK, selection)))
    asked = [
        job_id for ids in await _chunks(pool, _REQUEST_CANCEL_CHUNK, selection) for job_id in ids
    ]
    return cancelled, asked


async def retry(pool: Any, selection: Selection) -> int:
    """Retry the FAILED and CANCELLED jobs selected, as ``db.jobs.retry_by_hand``
    does one; wakes the workers once. How many."""
    retried = int(sum(await _chunks(pool, _RETRY_CHUNK, selection)))
    retried += await _retry_workflow_jobs(pool, selection)
    if retried:
        await pool.execute("SELECT pg_notify('orchestrix_jobs', '')")
    return retried


@contextlib.asynccontextmanager
async def _connection(pool_or_conn: Any) -> AsyncIterator[Any]:
    """A connection: one of the pool's, or the connection given (the API hands one
    over that names the request's key)."""
    if hasattr(pool_or_conn, "acquire"):
        async with pool_or_conn.acquire() as conn:
            yield conn
    else:
        yield pool_or_conn


async def _retry_workflow_jobs(pool: Any, selection: Selection) -> int:
    """Retry the selected FAILED and CANCELLED jobs of workflows, one by one; how many."""
    retried = 0
    cursor = ""
    while True:
        rows = await pool.fetch(_WORKFLOW_JOBS_CHUNK, cursor, *selection.params(), CHUNK)
        if not rows:
            return retried
        for row in rows:
            async with _connection(pool) as conn:
                if await workflows.retry(conn, row["id"]) is not None:
                    retried += 1
        cursor = rows[-1]["id"]
