"""The limited claim: jobs that a limit holds back, claimed in turns fleet-wide.

Three limits hold across every worker and scheduler:

- a concurrency key: at most the queue's ``key_limit`` jobs (1 when the queue
  sets none) with one ``concurrency_key`` run at once;
- a queue's ``running_limit``: at most that many of the queue's jobs run at once;
- a rate limit (``rate_limits``, db.rate_limits): a token bucket that gains
  ``per_second`` tokens a second up to ``burst``; each start of a job that names
  it takes one, so the starts in any span of t seconds are at most
  ``burst + per_second * t``.

Why a claim of its own. The plain claim (db.jobs.claim) lets any number of
workers claim at once (SKIP LOCKED); for limited jobs that would let two workers
each see 4 of 5 running and each start one. So limited claims take turns: each
runs in a transaction that first takes one advisory lock (``KEYED_LOCK``, held
to its commit), then, in a statement of its own and so with a snapshot taken
after the lock, counts what runs and what each bucket holds, and claims only
the room left. The previous limited claim has committed by then (it released
the lock at its commit), so its jobs and the tokens it took are counted; jobs
that end meanwhile only make room. Nothing else moves a limited job to RUNNING:
the plain claim never sees a job with a key or a rate limit (jobs_claim_idx
holds none, migrations 0011 and 0013) and passes over the queues that have a
running limit. A change of a bucket over the API takes the same lock.

Per-key turns (an advisory lock per key, tried, not waited for) were tried on
2026-12-02 and dropped: a worker claims for all its free slots at once, often
as many jobs as there are keys, so one claim held every key and the other
workers' claims came back empty and looked again later; the keyed drain fell
from 79 % of the plain one to 50 %. Waiting on one lock costs no CPU.

Within a key, jobs start in priority, then ``run_at`` order; across keys, the
room is shared in turns: within a claim, every key it holds gets its first job
before any gets its second, and each worker's claims walk the keys round
(``Round``), so one key's backlog of 100,000 does not delay another key's job.
A key's limit applies within its queue. A job may carry a key and a rate limit,
in a queue with a running limit: it starts only when all three have room (a
job passed over for one limit may keep another's room unused until the next
claim: the limits are never exceeded, and may be left short for one turn).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrix.db.jobs import start_chosen
from orchestrix.models import Job

Conn = Any

# An arbitrary constant naming the limited claims' turn in pg_locks.
KEYED_LOCK = 0x4F52_4358_4B45_5944  # "ORCXKEYD"

_WAITING = "state IN ('PENDING', 'RETRYING')"

# A key's room (`free`): its queue's key_limit (1 when none) less what runs with
# it (jobs_running_key_idx). It is `open` when it has room, its queue is served
# and not paused, and it has a due job of a type served (read in the index's
# order, not as an EXISTS: the planner drops an EXISTS's ORDER BY, and by a
# key's statistics may then scan the table for another key's one job: 30 ms a
# key beside a backlog). OFFSET 0 keeps each subquery whole: inlined, `free`
# would be counted once for each use.
_KEY_OPEN = """
CROSS JOIN LATERAL (
    SELECT COALESCE((SELECT key_limit FROM queues WHERE queues.name = k.queue), 1)
           - (SELECT count(*) FROM jobs AS running
              WHERE running.state = 'RUNNING' AND running.concurrency_key IS NOT NULL
                AND running.queue = k.queue
                AND running.concurrency_key = k.concurrency_key) AS free
    OFFSET 0
) AS r CROSS JOIN LATERAL (
    SELECT r.free > 0
           AND ($1::text[] IS NULL OR k.queue = ANY($1::text[]))
           AND NOT EXISTS (
               SELECT 1 FROM queues WHERE queues.name = k.queue AND queues.paused_at IS NOT NULL
           )
           AND (
               SELECT true FROM jobs AS due
               WHERE due.state IN ('PENDING', 'RETRYING') AND due.concurrency_key IS NOT NULL
                 AND due.queue = k.queue AND due.concurrency_key = k.concurrency_key
                 AND due.run_at <= now() AND due.type = ANY($2::text[])
               ORDER BY due.priority DESC, due.run_at, due.id
               LIMIT 1
           ) IS NOT NULL AS open
    OFFSET 0
) AS o"""

# The first (queue, key) with waiting jobs after `after`; past the last one, the
# first of all, once (`wrapped`).
_NEXT_KEY = f"""
    (SELECT queue, concurrency_key, {{wrapped}} AS wrapped FROM jobs
     WHERE {_WAITING} AND concurrency_key IS NOT NULL
       AND (queue, concurrency_key) > {{after}}
     ORDER BY queue, concurrency_key LIMIT 1)
    UNION ALL
    (SELECT queue, concurrency_key, true FROM jobs
     WHERE {_WAITING} AND concurrency_key IS NOT NULL AND {{may_wrap}}
     ORDER BY queue, concurrency_key LIMIT 1)
    LIMIT 1"""

# $1 queues (NULL: all), $2 types, $3 at most this many, $4 the worker, $5 lease,
# $6/$7 the (queue, key) the worker's previous limited claim's walk ended at
# ('', '': none, before every key: no queue name is empty).
#
# `keys` walks jobs_keyed_claim_idx from the key after $6/$7 to each (queue, key)
# with waiting jobs, round the end to the first, and stops once $3 of them are
# open (each gives at least one job) or it is back where it began: a claim
# visits about as many keys as it takes jobs, however many keys wait, and the
# next claim goes on from where this one ended (`walked`, on every row). `room`
# is each open key's room. `limited` is each running-limited queue's room,
# `unkeyed` its jobs without key or rate limit (jobs_claim_idx, per type).
# `buckets` is what each rate limit holds, by the clock read after the lock
# (now() is the transaction's start, which may precede the previous claim's),
# and `rated` the jobs with a rate limit and no key (jobs_rated_claim_idx).
# `turns` keeps, of all those candidates, the ones every limit has room for;
# `spent` takes their tokens.
_CLAIM_LIMITED = f"""
WITH RECURSIVE keys AS (
    SELECT k.queue, k.concurrency_key, k.wrapped, r.free, o.open, o.open::int AS found,
           1 AS step
    FROM ({_NEXT_KEY.format(wrapped="false", after="($6::text, $7::text)", may_wrap="true")}) AS k {
    _KEY_OPEN
}
    UNION ALL
    SELECT k.queue, k.concurrency_key, k.wrapped, r.free, o.open, keys.found + o.open::int,
           keys.step + 1
    FROM keys CROSS JOIN LATERAL ({
    _NEXT_KEY.format(
        wrapped="keys.wrapped",
        after="(keys.queue, keys.concurrency_key)",
        may_wrap="NOT keys.wrapped",
    )
}) AS k {_KEY_OPEN}
    WHERE keys.found < $3
      AND NOT (k.wrapped AND (k.queue, k.concurrency_key) > ($6::text, $7::text))
), room AS (
    SELECT queue, concurrency_key, free FROM keys WHERE open
), clock AS (
    SELECT clock_timestamp() AS at
), share AS (
    -- Twice the turns $3 needs if every key with room had that many jobs: keys
    -- with fewer leave room to the others, mostly.
    SELECT ceil(2 * $3::numeric / greatest(1, count(*)))::int AS turns FROM room
), limited AS (
    SELECT queues.name AS queue,
           queues.running_limit - (SELECT count(*) FROM jobs AS running
                                   WHERE running.state = 'RUNNING'
                                     AND running.queue = queues.name) AS free
    FROM queues
    WHERE queues.running_limit IS NOT NULL AND queues.paused_at IS NULL
      AND ($1::text[] IS NULL OR queues.name = ANY($1::text[]))
), buckets AS (
    SELECT name,
           least(burst::float8, tokens + per_second
                 * greatest(0, extract(epoch FROM clock.at - refilled_at))) AS available
    FROM rate_limits CROSS JOIN clock
), keyed AS (
    SELECT due.* FROM room CROSS JOIN LATERAL (
        SELECT id, queue, concurrency_key AS grp, rate_limit, priority, run_at, state FROM jobs
        WHERE {_WAITING} AND concurrency_key IS NOT NULL
          AND queue = room.queue AND concurrency_key = room.concurrency_key
          AND run_at <= now() AND type = ANY($2::text[])
        ORDER BY priority DESC, run_at, id
        LIMIT least(room.free, $3, (SELECT turns FROM share))
    ) AS due
), unkeyed AS (
    SELECT due.* FROM limited CROSS JOIN unnest($2::text[]) AS served(type) CROSS JOIN LATERAL (
        SELECT id, queue, NULL::text AS grp, NULL::text AS rate_limit, priority, run_at, state
        FROM jobs
        WHERE {_WAITING} AND concurrency_key IS NULL AND rate_limit IS NULL
          AND queue = limited.queue AND type = served.type AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT least(limited.free, $3)
    ) AS due
    WHERE limited.free > 0
), rated AS (
    SELECT due.* FROM buckets CROSS JOIN LATERAL (
        SELECT id, queue, NULL::text AS grp, rate_limit, priority, run_at, state FROM jobs
        WHERE {_WAITING} AND concurrency_key IS NULL AND rate_limit = buckets.name
          AND run_at <= now() AND type = ANY($2::text[])
          AND ($1::text[] IS NULL OR queue = ANY($1::text[]))
          AND NOT EXISTS (
              SELECT 1 FROM queues WHERE queues.name = jobs.queue AND queues.paused_at IS NOT NULL
          )
        ORDER BY priority DESC, run_at, id
        LIMIT least(floor(buckets.available)::int, $3)
    ) AS due
    WHERE buckets.available >= 1
), candidates AS (
    SELECT * FROM keyed UNION ALL SELECT * FROM unkeyed UNION ALL SELECT * FROM rated
), ranked AS (
    SELECT candidates.*,
           row_number() OVER (PARTITION BY queue, grp ORDER BY priority DESC, run_at, id) AS turn,
           row_number() OVER (PARTITION BY queue ORDER BY priority DESC, run_at, id) AS in_queue,
           row_number() OVER (
               PARTITION BY rate_limit ORDER BY priority DESC, run_at, id
           ) AS in_bucket
    FROM candidates
), turns AS (
    SELECT ranked.id, ranked.priority, ranked.run_at, ranked.state, ranked.turn
    FROM ranked
    LEFT JOIN limited ON limited.queue = ranked.queue
    LEFT JOIN buckets ON buckets.name = ranked.rate_limit
    WHERE (limited.queue IS NULL OR ranked.in_queue <= limited.free)
      AND (ranked.rate_limit IS NULL OR ranked.in_bucket <= buckets.available)
), {start_chosen("(SELECT at FROM clock)", lock=True)}, spent AS (
    UPDATE rate_limits
    SET tokens = buckets.available - taken.n,
        refilled_at = greatest(rate_limits.refilled_at, clock.at)
    FROM (SELECT rate_limit, count(*) AS n FROM moved
          WHERE rate_limit IS NOT NULL GROUP BY rate_limit) AS taken,
         buckets, clock
    WHERE rate_limits.name = taken.rate_limit AND buckets.name = taken.rate_limit
), walked AS (
    SELECT queue, concurrency_key FROM keys ORDER BY step DESC LIMIT 1
)
SELECT moved.*, walked.queue AS walked_queue, walked.concurrency_key AS walked_key
FROM moved LEFT JOIN walked ON true
"""

# One probe of each index a limited job may wait in.
_ANY_WAITING = f"""
SELECT EXISTS (
    SELECT 1 FROM jobs
    WHERE {_WAITING} AND concurrency_key IS NOT NULL AND run_at <= now()
) OR EXISTS (
    SELECT 1 FROM jobs
    WHERE {_WAITING} AND concurrency_key IS NULL AND rate_limit IS NOT NULL AND run_at <= now()
) OR EXISTS (
    SELECT 1 FROM queues
    WHERE running_limit IS NOT NULL AND EXISTS (
        SELECT 1 FROM jobs
        WHERE {_WAITING} AND concurrency_key IS NULL AND rate_limit IS NULL
          AND jobs.queue = queues.name AND run_at <= now()
    )
)
"""


@dataclass
class Round:
    """Where one worker's limited claims are in their round of the keys: the
    (queue, key) the last one's walk ended at; the next one's begins after it."""

    after: tuple[str, str] | None = None


async def claim(
    conn: Conn,
    *,
    worker_id: str,
    queues: Sequence[str] | None,
    types: Sequence[str],
    limit: int,
    lease_s: float,
    round_: Round | None = None,
) -> list[Job]:
    """Move up to ``limit`` due limited jobs to RUNNING for ``worker_id``, each
    within every limit it is under. ``conn`` must be one connection (not a pool):
    the claim is a transaction. Run it on a connection opened with
    db.jobs.CLAIM_SERVER_SETTINGS. With ``round_``, the walk of the keys begins
    where that round's previous claim ended, and the round moves on; without,
    at the first key."""
    if limit <= 0 or not types:
        return []
    queue_list = None if queues is None else list(queues)
    after = ("", "") if round_ is None or round_.after is None else round_.after
    # BEGIN, generic plans and the lock in one round trip (a simple query). A
    # custom plan of this statement is planned anew at each claim, which costs
    # more than running it (about 6 against 3 ms for a claim of 25).
    await conn.execute(
        "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan;"
        f" SELECT pg_advisory_xact_lock({KEYED_LOCK})"
    )
    try:
        rows = await conn.fetch(
            _CLAIM_LIMITED, queue_list, list(types), limit, worker_id, lease_s, *after
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")
    if round_ is not None:
        # No job: the walk went round every key, or found none; begin at the first.
        walked = rows[0]["walked_queue"] if rows else None
        round_.after = None if walked is None else (walked, rows[0]["walked_key"])
    jobs = [Job.from_row(row) for row in rows]
    jobs.sort(key=lambda job: (-job.priority, job.run_at, job.id))
    return jobs


async def any_waiting(conn: Conn) -> bool:
    """Whether any limited job is due (a probe of each index they wait in)."""
    return bool(await conn.fetchval(_ANY_WAITING))
