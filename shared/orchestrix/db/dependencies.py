"""The part of a success that concerns a workflow: its job's children may start.

A workflow's job waits (``WAITING``) while ``waiting_for``, the number of its
parents that have not SUCCEEDED, is above 0. :func:`released` builds the CTEs
that a statement recording successes (db.jobs) adds after its ``moved``: each
child of a job that succeeded loses one from ``waiting_for`` per such parent,
and a child that reaches 0 is PENDING at once, with its event, and the workers
are woken. For jobs of no workflow it reads nothing: ``moved`` rows without a
``workflow_id`` are left out before the dependency index is looked at.

The children are locked in id order (``FOR UPDATE`` over a sorted list), as the
settler locks the descendants it cancels, so that two statements releasing or
cancelling the same children never wait for each other in a circle. Two
parents of one child succeeding at once, in two statements, each take their
one off under the row's lock: the count never misses one.
"""

from __future__ import annotations

from orchestrix.db.events import WORKER_ACTOR, recorded

# Reads `moved` (id, workflow_id); defines `released` (the children moved on or
# counted down) and `woken` (a wake-up for the workers when any became PENDING).
RELEASED = f"""
parents_done AS (
    SELECT d.job_id, count(*)::int AS parents
    FROM moved JOIN job_dependencies AS d ON d.parent_id = moved.id
    WHERE moved.workflow_id IS NOT NULL
    GROUP BY d.job_id
), children AS (
    SELECT jobs.id, parents_done.parents
    FROM jobs JOIN parents_done ON parents_done.job_id = jobs.id
    WHERE jobs.state || '' = 'WAITING'  -- by primary key (see db.jobs._SUCCEED_MANY)
    ORDER BY jobs.id
    FOR UPDATE OF jobs
), released AS (
    UPDATE jobs
    SET waiting_for = greatest(jobs.waiting_for - children.parents, 0),
        state = CASE WHEN jobs.waiting_for <= children.parents THEN 'PENDING' ELSE 'WAITING' END,
        updated_at = now()
    FROM children
    WHERE jobs.id = children.id AND jobs.state || '' = 'WAITING'
    -- The worker whose success released them (one worker writes a statement's).
    RETURNING jobs.id, jobs.state, jobs.attempt, jobs.queue, jobs.type, jobs.workflow_id,
              (SELECT max(moved.worker_id) FROM moved) AS worker_id
), {
    recorded(
        "released",
        from_state="'WAITING'",
        actor=WORKER_ACTOR,
        name="recorded_released",
        where="state = 'PENDING'",
    )
}, woken AS (
    SELECT pg_notify('orchestrix_jobs', '')
    FROM (SELECT 1 FROM released WHERE state = 'PENDING' LIMIT 1) AS any_released
)"""

# For the statement's own SELECT: evaluated once, it makes `woken` run (a CTE
# that nothing reads is never run).
WAKE = "(SELECT count(*) FROM woken) >= 0"
