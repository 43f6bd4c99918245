"""Bulk actions: cancel or retry every job a filter matches, in bounded chunks.

Each chunk is one statement over at most ``CHUNK`` jobs, walked in id order, so
no statement holds many row locks for long: a worker's claim skips the rows a
chunk holds (SKIP LOCKED) instead of waiting, and a chunk that meets a row a
claim holds waits only for that claim's commit. Every update re-checks the
state it moves from (the state table's guard), so a job a worker took meanwhile
is left alone, never moved against the table.

The walk hands out ranges of ids of about ``CHUNK`` selected jobs each, in
order, and up to ``WRITERS`` connections write them at once. A chunk's cost is
its rows' writes, half of it the five index entries each moved row gets (perf, on
PostgreSQL 15), all on one backend's core: one connection retried 100,000 jobs in
12.2-13.3 s beside a 2-worker drain, two in 8.7-9.9 s, while the drain started
about a fifth fewer jobs a second. The second connection is only borrowed when
the pool has one to spare (``Spare``); without it the first does all the chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix.db import jobs, workflows
from orchestrix.db.events import SESSION_ACTOR, recorded
from orchestrix.states import CANCELLABLE_AT_ONCE, RETRYABLE_BY_HAND, JobState

Conn = Any
CHUNK = 5_000
WRITERS = 2
# Another connection for the walk's writers, or None when none is to spare.
Spare = Callable[[], contextlib.AbstractAsyncContextManager[Conn | None]]


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
# $6 created after, $7 created before, $8 chunk size, $9 the range's last id
# (NULL: to the end; '~' sorts after every id, and keeps the bound in the index
# scan's condition, so that a range with fewer than $8 jobs left stops at its
# end); {sources}: the states it moves from. Each chunk's UPDATE finds its rows
# by primary key, from the array of picked ids; its state guard is written
# `(...) IS TRUE` so that it cannot use jobs_state_id_idx. With statistics from
# before a big change (all PENDING, no CANCELLED yet) the planner took that index
# for 1 row and checked each of the 100,000 it found against the 5,000 picked
# ids: 8.7 s a chunk of a bulk retry.
_MATCH = """
SELECT {columns} FROM jobs
WHERE id > $1 AND id <= COALESCE($9::text, '~') AND state = ANY({sources}::text[])
  AND ($2::text[] IS NULL OR id = ANY($2::text[]))
  AND ($3::text[] IS NULL OR state = ANY($3::text[]))
  AND ($4::text IS NULL OR type = $4) AND ($5::text IS NULL OR queue = $5)
  AND ($6::timestamptz IS NULL OR created_at >= $6)
  AND ($7::timestamptz IS NULL OR created_at < $7)
  {also}
ORDER BY id
{limit}
"""


@dataclass(frozen=True)
class _Action:
    """A bulk action's two statements: ``chunk`` moves the jobs of one range,
    ``bound`` finds where the next range ends."""

    chunk: str
    bound: str


def _action(
    sources: frozenset[JobState],
    set_clause: str,
    moved: str,
    *,
    changes_state: bool = True,
    also: str = "",
) -> _Action:
    """A bulk action over the selected jobs in ``sources``.

    Its chunk picks the next jobs the selection matches and moves them with
    ``set_clause``; it returns the last id picked, how many, and ``moved``. A chunk
    that changes the jobs' state locks what it picks (FOR UPDATE), so that the
    state it read is the one each event names as the move's start. Its bound is
    the ``$8``-th selected job after the cursor; none when fewer are left (the
    range then runs to the end).
    """
    states = ", ".join(f"'{state.value}'" for state in sorted(sources))
    bound = _MATCH.format(
        columns="id", sources=f"ARRAY[{states}]", also=also, limit="OFFSET $8 - 1 LIMIT 1"
    )
    match = _MATCH.format(
        columns="id, state AS from_state, attempt AS from_attempt",
        sources=f"ARRAY[{states}]",
        also=also,
        limit="LIMIT $8",
    )
    events = ""
    if changes_state:
        match += "FOR UPDATE\n"
        source = "moved JOIN picked USING (id)"
        events = ", " + recorded(
            source, from_state="from_state", attempt="from_attempt", actor=SESSION_ACTOR
        )
    chunk = f"""
WITH picked AS ({match}),
moved AS (
    UPDATE jobs SET {set_clause}
    WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked)) AND (jobs.state IN ({states})) IS TRUE
    RETURNING jobs.id, jobs.state, jobs.queue, jobs.type, jobs.workflow_id
){events}
SELECT (SELECT max(id) FROM picked) AS last, (SELECT count(*) FROM picked) AS picked,
       {moved} AS moved
"""
    return _Action(chunk, bound)


_COUNT = "(SELECT count(*) FROM moved)"
_CANCEL = _action(CANCELLABLE_AT_ONCE, jobs.CANCEL_SET, _COUNT)
# A workflow's jobs are retried one by one (db.workflows.retry): each decides
# its state by its parents, and brings back what its end had cancelled.
_RETRY = _action(RETRYABLE_BY_HAND, jobs.RETRY_BY_HAND_SET, _COUNT, also="AND workflow_id IS NULL")
_WORKFLOW_JOBS_CHUNK = _MATCH.format(
    columns="id",
    sources="ARRAY['CANCELLED', 'FAILED']",
    also="AND workflow_id IS NOT NULL",
    limit="LIMIT $8",
)
# Running jobs cannot be cancelled by the API itself: their workers are asked.
_REQUEST_CANCEL = _action(
    frozenset({JobState.RUNNING}),
    jobs.REQUEST_CANCEL_SET,
    "ARRAY(SELECT id FROM moved)",
    changes_state=False,
)


class _Walk:
    """The selection's ranges of ids, in order, to whichever writer asks next."""

    def __init__(self, bound: str, selection: Selection) -> None:
        self._bound = bound
        self._params = selection.params()
        self._cursor: str | None = ""
        self._lock = asyncio.Lock()

    @property
    def done(self) -> bool:
        return self._cursor is None

    async def next(self, conn: Conn) -> tuple[str, str | None] | None:
        """The next range, as (after this id, up to this one or to the end); None once
        the last range is handed out."""
        async with self._lock:
            low = self._cursor
            if low is None:
                return None
            self._cursor = await conn.fetchval(self._bound, low, *self._params, CHUNK, None)
            return low, self._cursor


async def _chunks(
    conn: Conn, action: _Action, selection: Selection, spare: Spare | None
) -> list[Any]:
    """Run ``action`` over the selection, chunk after chunk, on ``conn`` and, when there
    is more than one range, on up to ``WRITERS - 1`` spare connections at once; each
    chunk's ``moved``."""
    walk = _Walk(action.bound, selection)
    params = selection.params()
    results: list[Any] = []

    async def write(on: Conn, span: tuple[str, str | None] | None) -> None:
        while span is not None:
            cursor, last = span
            while True:  # more than CHUNK jobs may have entered the range since
                row = await on.fetchrow(action.chunk, cursor, *params, CHUNK, last)
                if row["picked"]:
                    results.append(row["moved"])
                if row["picked"] < CHUNK or row["last"] == last:
                    break
                cursor = row["last"]
            span = await walk.next(on)

    async def write_on_spare() -> None:
        assert spare is not None
        async with spare() as other:
            if other is not None:
                await write(other, await walk.next(other))

    writers = [asyncio.ensure_future(write(conn, await walk.next(conn)))]
    if spare is not None and not walk.done:
        writers += [asyncio.ensure_future(write_on_spare()) for _ in range(WRITERS - 1)]
    try:
        await asyncio.gather(*writers)
    except BaseException:
        # The first error as it was raised (a TaskGroup would wrap it), once the
        # other writers have stopped.
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        raise
    return results


async def cancel(
    conn: Conn, selection: Selection, spare: Spare | None = None
) -> tuple[int, list[str]]:
    """Cancel the waiting jobs selected, at once; ask for the running ones' cancel.
    How many were cancelled, and the ids of the running jobs asked."""
    cancelled = int(sum(await _chunks(conn, _CANCEL, selection, spare)))
    asked = await _chunks(conn, _REQUEST_CANCEL, selection, spare)
    return cancelled, [job_id for ids in asked for job_id in ids]


async def retry(conn: Conn, selection: Selection, spare: Spare | None = None) -> int:
    """Retry the FAILED and CANCELLED jobs selected, as ``db.jobs.retry_by_hand``
    does one; wakes the workers once. How many."""
    retried = int(sum(await _chunks(conn, _RETRY, selection, spare)))
    retried += await _retry_workflow_jobs(conn, selection)
    if retried:
        await conn.execute("SELECT pg_notify('orchestrix_jobs', '')")
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
        rows = await pool.fetch(_WORKFLOW_JOBS_CHUNK, cursor, *selection.params(), CHUNK, None)
        if not rows:
            return retried
        for row in rows:
            async with _connection(pool) as conn:
                if await workflows.retry(conn, row["id"]) is not None:
                    retried += 1
        cursor = rows[-1]["id"]
