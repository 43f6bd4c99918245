"""The keyed claim: jobs with a concurrency key, never more of one key running at once
than its queue's ``key_limit`` (1 when the queue sets none), fleet-wide.

Why a claim of its own. The plain claim (db.jobs.claim) lets any number of
workers claim at once (SKIP LOCKED); for keyed jobs that would let two workers
each see 4 of 5 running and each start one. So keyed claims take turns: each
runs in a transaction that first takes one advisory lock (``KEYED_LOCK``, held
to its commit), then, in a statement of its own and so with a snapshot taken
after the lock, counts what each key runs and claims only the room left. The
previous keyed claim has committed by then (it released the lock at its commit),
so its jobs are counted; jobs that end meanwhile only make room. Nothing else
moves a keyed job to RUNNING, and the plain claim never sees one: jobs_claim_idx
holds only jobs without a key (migration 0011).

Within a key, jobs start in priority, then ``run_at`` order; across keys, the
room is shared in turns: every key with room gets its first job before any gets
its second, so one key's backlog of 100,000 does not delay another key's job.
A key's limit applies within its queue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from orchestrix.db.jobs import START_CHOSEN
from orchestrix.models import Job

Conn = Any

# An arbitrary constant naming the keyed claims' turn in pg_locks.
KEYED_LOCK = 0x4F52_4358_4B45_5944  # "ORCXKEYD"

# $1 queues (NULL: all), $2 types, $3 at most this many, $4 the worker, $5 lease.
# `keys` skips through jobs_keyed_claim_idx to each (queue, key) with waiting jobs;
# `room` is each one's limit less what runs (jobs_running_key_idx).
_CLAIM_KEYED = f"""
WITH RECURSIVE keys AS (
    (SELECT queue, concurrency_key FROM jobs
     WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NOT NULL
     ORDER BY queue, concurrency_key LIMIT 1)
    UNION ALL
    SELECT next.queue, next.concurrency_key FROM keys CROSS JOIN LATERAL (
        SELECT queue, concurrency_key FROM jobs
        WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NOT NULL
          AND (queue, concurrency_key) > (keys.queue, keys.concurrency_key)
        ORDER BY queue, concurrency_key LIMIT 1
    ) AS next
), room AS (
    SELECT keys.queue, keys.concurrency_key,
           COALESCE((SELECT key_limit FROM queues WHERE queues.name = keys.queue), 1)
           - (SELECT count(*) FROM jobs AS running
              WHERE running.state = 'RUNNING' AND running.concurrency_key IS NOT NULL
                AND running.queue = keys.queue
                AND running.concurrency_key = keys.concurrency_key) AS free
    FROM keys
    WHERE ($1::text[] IS NULL OR keys.queue = ANY($1::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM queues WHERE queues.name = keys.queue AND queues.paused_at IS NOT NULL
      )
), candidates AS (
    SELECT due.* FROM room CROSS JOIN LATERAL (
        SELECT id, queue, concurrency_key, priority, run_at, state FROM jobs
        WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NOT NULL
          AND queue = room.queue AND concurrency_key = room.concurrency_key
          AND run_at <= now() AND type = ANY($2::text[])
        ORDER BY priority DESC, run_at, id
        LIMIT least(room.free, $3)
        FOR UPDATE SKIP LOCKED
    ) AS due
    WHERE room.free > 0
), turns AS (
    SELECT id, priority, run_at, state,
           row_number() OVER (
               PARTITION BY queue, concurrency_key ORDER BY priority DESC, run_at, id
           ) AS turn
    FROM candidates
), {START_CHOSEN}
"""

_ANY_WAITING = """
SELECT EXISTS (
    SELECT 1 FROM jobs
    WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NOT NULL AND run_at <= now()
)
"""


async def claim(
    conn: Conn,
    *,
    worker_id: str,
    queues: Sequence[str] | None,
    types: Sequence[str],
    limit: int,
    lease_s: float,
) -> list[Job]:
    """Move up to ``limit`` due keyed jobs to RUNNING for ``worker_id``, each key
    within its limit. ``conn`` must be one connection (not a pool): the claim is
    a transaction. Run it on a connection opened with db.jobs.CLAIM_SERVER_SETTINGS."""
    if limit <= 0 or not types:
        return []
    queue_list = None if queues is None else list(queues)
    # BEGIN and the lock in one round trip (a simple query of two statements).
    await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({KEYED_LOCK})")
    try:
        rows = await conn.fetch(_CLAIM_KEYED, queue_list, list(types), limit, worker_id, lease_s)
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")
    jobs = [Job.from_row(row) for row in rows]
    jobs.sort(key=lambda job: (-job.priority, job.run_at, job.id))
    return jobs


async def any_waiting(conn: Conn) -> bool:
    """Whether any keyed job is due (one probe of jobs_keyed_claim_idx)."""
    return bool(await conn.fetchval(_ANY_WAITING))
