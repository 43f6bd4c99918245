"""Bulk actions: cancel or retry every job a filter matches, in bounded chunks.

Each chunk is one statement over at most ``CHUNK`` jobs, walked in id order, so
no statement holds many row locks for long: a worker's claim skips the rows a
chunk holds (SKIP LOCKED) instead of waiting, and a chunk that meets a row a
claim holds waits only for that claim's commit. Every update re-checks the
state it moves from (the state table's guard), so a job a worker took meanwhile
is left alone, never moved against the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix.states import JobState

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
SELECT id FROM jobs
WHERE id > $1 AND state = ANY({sources}::text[])
  AND ($2::text[] IS NULL OR id = ANY($2::text[]))
  AND ($3::text[] IS NULL OR state = ANY($3::text[]))
  AND ($4::text IS NULL OR type = $4) AND ($5::text IS NULL OR queue = $5)
  AND ($6::timestamptz IS NULL OR created_at >= $6)
  AND ($7::timestamptz IS NULL OR created_at < $7)
ORDER BY id
LIMIT $8
"""

_CANCEL_CHUNK = f"""
WITH picked AS ({_MATCH.format(sources="ARRAY['PENDING', 'RETRYING']")}),
moved AS (
    UPDATE jobs SET state = 'CANCELLED', completed_at = now(), updated_at = now()
    WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))
      AND (jobs.state IN ('PENDING', 'RETRYING')) IS TRUE
    RETURNING jobs.id
)
SELECT (SELECT max(id) FROM picked) AS last, (SELECT count(*) FROM moved) AS moved
"""

_RETRY_CHUNK = f"""
WITH picked AS ({_MATCH.format(sources="ARRAY['FAILED', 'CANCELLED']")}),
moved AS (
    UPDATE jobs
    SET state = 'PENDING', attempt = 0, run_at = now(), completed_at = NULL,
        scheduled_at = NULL, started_at = NULL, lease_expires_at = NULL,
        cancel_requested_at = NULL, handoffs = 0, result = NULL, worker_id = NULL,
        updated_at = now()
    WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))
      AND (jobs.state IN ('FAILED', 'CANCELLED')) IS TRUE
    RETURNING jobs.id
)
SELECT (SELECT max(id) FROM picked) AS last, (SELECT count(*) FROM moved) AS moved
"""

# Running jobs cannot be cancelled by the API itself: their workers are asked.
_REQUEST_CANCEL_CHUNK = f"""
WITH picked AS ({_MATCH.format(sources="ARRAY['RUNNING']")}),
moved AS (
    UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()),
                    updated_at = now()
    WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))
      AND (jobs.state = 'RUNNING') IS TRUE
    RETURNING jobs.id
)
SELECT (SELECT max(id) FROM picked) AS last, ARRAY(SELECT id FROM moved) AS moved
"""


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
    if retried:
        await pool.execute("SELECT pg_notify('orchestrix_jobs', '')")
    return retried
