"""Workflows: creating a group of jobs with their dependencies, reading it back,
cancelling the descendants of a job that failed, and resuming after a retry.

Creation is one transaction: the ``workflows`` row, every job (WAITING with
``waiting_for`` = its number of parents, or PENDING without any) with its
event, and the edges. A success releases children in the success's own
statement (db.dependencies). A failure does not: the statements that end an
attempt FAILED or CANCELLED are many, and the cascade through a graph of
descendants is better done once, by the settler (:func:`settle`), than in each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix import ids
from orchestrix.db import jobs as db_jobs
from orchestrix.db.events import REQUEST_KEY, SESSION_ACTOR, recorded
from orchestrix.db.pool import encode_json
from orchestrix.models import Job, NewJob, rfc3339
from orchestrix.states import RETRYABLE_BY_HAND, TERMINAL

Conn = Any


@dataclass(frozen=True)
class NewWorkflowJob:
    key: str
    job: NewJob
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workflow:
    id: str
    name: str | None
    created_at: datetime
    jobs: Sequence[Job]
    # (parent key, child key)
    edges: Sequence[tuple[str, str]]

    @property
    def state(self) -> str:
        """FAILED when a job failed or was cancelled and nothing is left to run,
        SUCCEEDED when every job did, else RUNNING."""
        states = {job.state.value for job in self.jobs}
        if not states <= {s.value for s in TERMINAL}:
            return "RUNNING"
        return "SUCCEEDED" if states == {"SUCCEEDED"} else "FAILED"

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
        return {
            "id": self.id,
            "name": self.name,
            "created_at": rfc3339(self.created_at),
            "state": self.state,
            "counts": counts,
            "jobs": [job.to_json() for job in self.jobs],
            "edges": [{"from": parent, "to": child} for parent, child in self.edges],
        }


_INSERT_WORKFLOW = "INSERT INTO workflows (id, name) VALUES ($1, $2) RETURNING created_at"

_INSERT_JOBS = f"""
WITH created AS (
    INSERT INTO jobs (id, type, queue, payload, priority, max_attempts, run_at,
                      timeout_seconds, workflow_id, workflow_key, waiting_for, state,
                      concurrency_key, rate_limit, created_by_key)
    SELECT id, type, queue, payload::jsonb, priority, max_attempts, COALESCE(run_at, now()),
           timeout_seconds, $10, key, waiting_for,
           CASE WHEN waiting_for > 0 THEN 'WAITING' ELSE 'PENDING' END, concurrency_key,
           rate_limit, {REQUEST_KEY}
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                $7::timestamptz[], $8::int[], $9::text[], $11::int[], $12::text[], $13::text[])
         AS new(id, type, queue, payload, priority, max_attempts, run_at, timeout_seconds,
                key, waiting_for, concurrency_key, rate_limit)
    RETURNING *
), {recorded("created", from_state="NULL::text", actor=SESSION_ACTOR)}
SELECT * FROM created
"""

_INSERT_EDGES = """
INSERT INTO job_dependencies (job_id, parent_id)
SELECT * FROM unnest($1::text[], $2::text[])
"""


async def create(
    conn: Conn, name: str | None, jobs: Sequence[NewWorkflowJob]
) -> tuple[Workflow, dict[str, Job]]:
    """Create the workflow and all its jobs in one transaction; ``jobs`` must form a
    DAG whose keys are unique (the API checks). Returns it, and its jobs by key."""
    workflow_id = ids.new_id()
    job_ids = {item.key: ids.new_id() for item in jobs}
    async with conn.transaction():
        created_at = await conn.fetchval(_INSERT_WORKFLOW, workflow_id, name)
        rows = await conn.fetch(
            _INSERT_JOBS,
            [job_ids[item.key] for item in jobs],
            [item.job.type for item in jobs],
            [item.job.queue for item in jobs],
            [encode_json(item.job.payload) for item in jobs],
            [item.job.priority for item in jobs],
            [item.job.max_attempts for item in jobs],
            [item.job.run_at for item in jobs],
            [item.job.timeout_seconds for item in jobs],
            [item.key for item in jobs],
            workflow_id,
            [len(set(item.depends_on)) for item in jobs],
            [item.job.concurrency_key for item in jobs],
            [item.job.rate_limit for item in jobs],
        )
        edges = [(job_ids[item.key], job_ids[p]) for item in jobs for p in set(item.depends_on)]
        if edges:
            await conn.execute(_INSERT_EDGES, [c for c, _ in edges], [p for _, p in edges])
    by_id = {row["id"]: Job.from_row(row) for row in rows}
    by_key = {key: by_id[job_id] for key, job_id in job_ids.items()}
    workflow = Workflow(
        workflow_id,
        name,
        created_at,
        [by_key[item.key] for item in jobs],
        [(p, item.key) for item in jobs for p in sorted(set(item.depends_on))],
    )
    return workflow, by_key


_GET = "SELECT id, name, created_at FROM workflows WHERE id = $1"
_JOBS = "SELECT * FROM jobs WHERE workflow_id = $1 ORDER BY id"
_EDGES = """
SELECT parent.workflow_key AS parent, child.workflow_key AS child
FROM jobs AS child
JOIN job_dependencies AS d ON d.job_id = child.id
JOIN jobs AS parent ON parent.id = d.parent_id
WHERE child.workflow_id = $1
ORDER BY child.id, parent.id
"""


async def get(conn: Conn, workflow_id: str) -> Workflow | None:
    row = await conn.fetchrow(_GET, workflow_id)
    if row is None:
        return None
    jobs = [Job.from_row(r) for r in await conn.fetch(_JOBS, workflow_id)]
    edges = [(r["parent"], r["child"]) for r in await conn.fetch(_EDGES, workflow_id)]
    return Workflow(row["id"], row["name"], row["created_at"], jobs, edges)


_PARENTS = """
SELECT parent.workflow_key AS key, parent.result
FROM job_dependencies AS d JOIN jobs AS parent ON parent.id = d.parent_id
WHERE d.job_id = $1
"""


async def parents(conn: Conn, job_id: str) -> dict[str, Any]:
    """The results of a job's parents, by their keys (for ``job.parents``)."""
    return {row["key"]: row["result"] for row in await conn.fetch(_PARENTS, job_id)}


# --- the settler: a failure's descendants ------------------------------------------

# $1: how many failed or cancelled jobs to settle. Their WAITING descendants,
# however deep, are CANCELLED (each naming the job that caused it), locked in
# id order; the jobs themselves are marked settled. The descendants are settled
# too: the walk covered theirs.
_SETTLE = f"""
WITH RECURSIVE ended AS (
    SELECT id, state, workflow_key FROM jobs
    WHERE workflow_id IS NOT NULL AND state IN ('FAILED', 'CANCELLED') AND NOT settled
    ORDER BY completed_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), below(id, cause) AS (
    SELECT d.job_id, ended.id FROM ended JOIN job_dependencies AS d ON d.parent_id = ended.id
    UNION
    SELECT d.job_id, below.cause FROM below JOIN job_dependencies AS d ON d.parent_id = below.id
), doomed AS (
    SELECT jobs.id, first.cause FROM jobs
    JOIN (SELECT DISTINCT ON (id) id, cause FROM below ORDER BY id, cause) AS first
      ON first.id = jobs.id
    WHERE jobs.state || '' = 'WAITING'  -- by primary key, not every waiting job
    ORDER BY jobs.id
    FOR UPDATE OF jobs
), moved AS (
    UPDATE jobs
    SET state = 'CANCELLED', completed_at = now(), waiting_for = 0, settled = true,
        cancelled_by = doomed.cause,
        last_error = 'DependencyFailed: its ancestor ' || ended.workflow_key || ' ('
                     || ended.id || ') ended ' || ended.state,
        updated_at = now()
    FROM doomed JOIN ended ON ended.id = doomed.cause
    WHERE jobs.id = doomed.id AND jobs.state || '' = 'WAITING'
    RETURNING jobs.id, jobs.state, jobs.attempt, jobs.queue, jobs.type, jobs.workflow_id
), {recorded("moved", from_state="'WAITING'", actor=f"COALESCE($2::text, {SESSION_ACTOR})")},
marked AS (
    UPDATE jobs SET settled = true WHERE id IN (SELECT id FROM ended)
)
SELECT (SELECT count(*) FROM ended) AS settled, (SELECT count(*) FROM moved) AS cancelled
"""


async def settle(conn: Conn, *, limit: int, actor: str | None = None) -> tuple[int, int]:
    """Cancel the WAITING descendants of up to ``limit`` workflow jobs that ended
    FAILED or CANCELLED: (jobs settled, descendants cancelled)."""
    row = await conn.fetchrow(_SETTLE, limit, actor)
    return int(row["settled"]), int(row["cancelled"])


# --- an operator's retry: the job, and what its end had cancelled ------------------

_RETRY_LOCK = """
SELECT id, state, attempt FROM jobs
WHERE id = $1 AND workflow_id IS NOT NULL AND state = ANY($2::text[])
FOR UPDATE
"""

# The descendants the job's end cancelled, locked in id order.
_CANCELLED_BY = """
SELECT id, state, attempt FROM jobs
WHERE cancelled_by = $1 AND state = 'CANCELLED'
ORDER BY id
FOR UPDATE
"""

# The parents of the group outside it, locked against a change while the counts
# are taken (FOR SHARE waits for a success being written, and reads its result).
_OUTSIDE_PARENTS = """
SELECT id, state FROM jobs
WHERE id IN (SELECT parent_id FROM job_dependencies WHERE job_id = ANY($1::text[]))
  AND NOT id = ANY($1::text[])
ORDER BY id
FOR SHARE
"""

_EDGES_OF = "SELECT job_id, parent_id FROM job_dependencies WHERE job_id = ANY($1::text[])"

_RESUME = f"""
WITH counts AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::int[])
        AS c(id, waiting_for, from_state, from_attempt)
), moved AS (
    UPDATE jobs
    SET {db_jobs.RETRY_BY_HAND_RESET},
        state = CASE WHEN counts.waiting_for > 0 THEN 'WAITING' ELSE 'PENDING' END,
        waiting_for = counts.waiting_for, cancelled_by = NULL, settled = false,
        last_error = CASE WHEN jobs.id = $5 THEN jobs.last_error END
    FROM counts
    WHERE jobs.id = counts.id AND jobs.state IN ('FAILED', 'CANCELLED')
    RETURNING jobs.*, counts.from_state, counts.from_attempt
), {recorded("moved", from_state="from_state", attempt="from_attempt", actor=SESSION_ACTOR)},
woken AS (
    SELECT pg_notify('orchestrix_jobs', '')
    FROM (SELECT 1 FROM moved WHERE state = 'PENDING' LIMIT 1) AS any_pending
)
SELECT * FROM moved WHERE (SELECT count(*) FROM woken) >= 0
"""

# A failed or cancelled parent outside the group: settle it again, so that the
# jobs brought back that still wait for it are cancelled once more.
_UNSETTLE = "UPDATE jobs SET settled = false WHERE id = ANY($1::text[])"


async def retry(conn: Conn, job_id: str) -> Job | None:
    """An operator's retry of a workflow's FAILED or CANCELLED job: it runs again
    (PENDING, or WAITING while some of its parents have not SUCCEEDED), and the
    descendants its end had cancelled come back WAITING for it. None when the job
    is no such job."""
    async with conn.transaction():
        sources = [s.value for s in RETRYABLE_BY_HAND]
        job = await conn.fetchrow(_RETRY_LOCK, job_id, sources)
        if job is None:
            return None
        group = {job["id"]: job, **{r["id"]: r for r in await conn.fetch(_CANCELLED_BY, job_id)}}
        members = list(group)
        outside = {r["id"]: r["state"] for r in await conn.fetch(_OUTSIDE_PARENTS, members)}
        waiting = dict.fromkeys(members, 0)
        for edge in await conn.fetch(_EDGES_OF, members):
            parent = edge["parent_id"]
            if parent in group or outside.get(parent) != "SUCCEEDED":
                waiting[edge["job_id"]] += 1
        rows = await conn.fetch(
            _RESUME,
            members,
            [waiting[m] for m in members],
            [group[m]["state"] for m in members],
            [group[m]["attempt"] for m in members],
            job_id,
        )
        stuck = [p for p, state in outside.items() if state in ("FAILED", "CANCELLED")]
        if stuck:
            await conn.execute(_UNSETTLE, stuck)
    moved = {row["id"]: Job.from_row(row) for row in rows}
    return moved.get(job_id)


def topological_order(depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    """The keys with every parent before its children; with a cycle, only those
    not on it nor behind it (fewer than all)."""
    remaining = {key: set(parents) for key, parents in depends_on.items()}
    children: dict[str, list[str]] = {key: [] for key in depends_on}
    for key, parents in remaining.items():
        for parent in parents:
            children[parent].append(key)
    ready = [key for key, parents in remaining.items() if not parents]
    order: list[str] = []
    while ready:
        key = ready.pop()
        order.append(key)
        for child in children[key]:
            remaining[child].discard(key)
            if not remaining[child]:
                ready.append(child)
    return order
