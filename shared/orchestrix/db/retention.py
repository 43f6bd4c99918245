"""The pruner's query on ``jobs``: delete one small batch of old finished jobs.

Kept apart from ``db.jobs`` because nothing else deletes jobs, and because the
statement is written for one thing: to take as little from the claims and the
state changes as it can.

- It names its state as a literal, one statement per finished state: then the
  planner can prove the partial index ``jobs_finished_idx`` (migration 0009)
  applies also in a generic plan of the prepared statement, and walks it from
  the oldest ``completed_at`` up to the cut-off, reading nothing else.
- It locks its batch ``FOR UPDATE SKIP LOCKED``: a row someone else holds (an
  operator's retry of a FAILED job, say) is left for a later batch, never
  waited for. Claims and starts lock only waiting and running jobs, which the
  index does not hold, so a batch and a claim never meet.
- The DELETE finds the locked rows by primary key, from the array of their ids.
  Joined to the batch instead (``id IN (SELECT ...)``), the planner guessed the
  batch's size and hashed it against a scan of the whole table. It needs no
  state guard of its own: the rows are locked from the pick on, so no one has
  moved them.
- The batch is small (the caller's ``limit``), so each transaction holds few
  locks and writes little WAL at a time.

- The job's events (``job_events``) go in the same statement, found by their
  primary key's first column, and so do a workflow job's edges
  (``job_dependencies``, both ways, looked for only for a workflow's jobs):
  neither table has a foreign key to cascade from, which would run a row
  trigger for every job deleted (migrations 0008 and 0016 say why).
- So does the ``workflows`` row of a workflow whose last jobs the batch holds
  (``jobs.workflow_id`` has no foreign key either: migration 0017). The
  statement sees the table as it was before it, the batch's own jobs too: a
  workflow goes when none of its jobs is left outside the batch. Only the
  maintenance leader prunes, one batch at a time, so no other batch deletes a
  workflow's other jobs meanwhile.
"""

from __future__ import annotations

from typing import Any

from orchestrix.states import TERMINAL, JobState

Conn = Any

# $1: the state's retention in seconds (above 0), $2: the batch size. ``now()``
# is the transaction's start, as ``completed_at`` was written with it.
_PRUNE = """
WITH doomed AS (
    SELECT id, workflow_id FROM jobs
    WHERE state = '{state}' AND completed_at < now() - $1 * interval '1 second'
    ORDER BY completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM jobs WHERE id = ANY(ARRAY(SELECT id FROM doomed))
    RETURNING 1
),
events_gone AS (
    DELETE FROM job_events WHERE job_id = ANY(ARRAY(SELECT id FROM doomed))
),
edges_gone AS (
    DELETE FROM job_dependencies
    WHERE job_id = ANY(ARRAY(SELECT id FROM doomed WHERE workflow_id IS NOT NULL))
       OR parent_id = ANY(ARRAY(SELECT id FROM doomed WHERE workflow_id IS NOT NULL))
),
workflows_gone AS (
    DELETE FROM workflows AS w
    WHERE id = ANY(ARRAY(SELECT DISTINCT workflow_id FROM doomed WHERE workflow_id IS NOT NULL))
      AND NOT EXISTS (
          SELECT 1 FROM jobs
          WHERE jobs.workflow_id = w.id AND jobs.id NOT IN (SELECT id FROM doomed)
      )
)
SELECT count(*) FROM gone
"""

PRUNE: dict[JobState, str] = {state: _PRUNE.format(state=state.value) for state in sorted(TERMINAL)}


async def prune(conn: Conn, state: JobState, older_than_s: float, limit: int) -> int:
    """Delete at most ``limit`` jobs in ``state`` that finished more than
    ``older_than_s`` seconds ago, oldest first; how many were deleted."""
    if state not in TERMINAL:
        raise ValueError(f"only finished jobs are pruned, not {state.value}")
    if older_than_s <= 0:
        raise ValueError("a retention of 0 keeps jobs forever: there is nothing to prune")
    deleted: int = await conn.fetchval(PRUNE[state], older_than_s, limit)
    return deleted
