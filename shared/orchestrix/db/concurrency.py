"""The limited claim: jobs that a limit holds back, claimed in turns per limit.

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
each see 4 of 5 running and each start one. So limited claims take turns, per
limit: each key, each running-limited queue and each rate limit has its own
advisory lock (its turn). A claim is a transaction of two statements. The first
walks the keys and tries the turns of those with room, and of the queues and
rate limits it may start jobs under (a try never waits: a turn another claim
holds is passed over, and that claim takes those jobs). The second, with a
snapshot taken after the turns, counts what runs and what each bucket holds,
and claims only the room left, and only jobs every one of whose limits it holds.
Every claim that held one of those turns before has committed by then (it
released the turn at its commit), so its jobs and the tokens it took are
counted; jobs that end meanwhile only make room. Claims on different keys run at
once. Nothing else moves a limited job to RUNNING: the plain claim never sees a
job with a key or a rate limit (jobs_claim_idx holds none, migrations 0011 and
0013) and passes over the queues that have a running limit. A change of a
bucket over the API waits for its turn.

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

# The classes (the first half of a two-part advisory lock) of what the limited
# claims take turns on; the second half is hashtext of the name. Two names
# with one hash share a turn: harmless, the turn is only taken more often.
KEY_LOCKS = 0x4F52_4B59  # "ORKY": a (queue, concurrency key)
QUEUE_LOCKS = 0x4F52_5155  # "ORQU": a queue with a running limit
BUCKET_LOCKS = 0x4F52_524C  # "ORRL": a rate limit

_WAITING = "state IN ('PENDING', 'RETRYING')"

# What a bucket holds by `clock` (the clock read in this statement: now() is the
# transaction's start, which may precede the previous turn's spend).
_AVAILABLE = """least(burst::float8, tokens + per_second
                 * greatest(0, extract(epoch FROM clock.at - refilled_at)))"""

# A key's room: its queue's key_limit (1 when none) less what runs with it
# (jobs_running_key_idx). (OFFSET 0 keeps each subquery whole: inlined, `free`
# would be counted once for each use.)
_KEY_FREE = """
CROSS JOIN LATERAL (
    SELECT COALESCE((SELECT key_limit FROM queues WHERE queues.name = k.queue), 1)
           - (SELECT count(*) FROM jobs AS running
              WHERE running.state = 'RUNNING' AND running.concurrency_key IS NOT NULL
                AND running.queue = k.queue
                AND running.concurrency_key = k.concurrency_key) AS free
    OFFSET 0
) AS r"""

# A key is `held` when it has room, its queue is served and not paused, it has a
# due job of a type served, and this claim got its turn (a try: a key another
# claim holds is passed over). CASE, not AND, so that the lock is tried last.
_KEY_HELD = f"""{_KEY_FREE} CROSS JOIN LATERAL (
    SELECT CASE WHEN r.free > 0
                 AND ($1::text[] IS NULL OR k.queue = ANY($1::text[]))
                 AND NOT EXISTS (
                     SELECT 1 FROM queues
                     WHERE queues.name = k.queue AND queues.paused_at IS NOT NULL
                 )
                 AND EXISTS (
                     SELECT 1 FROM jobs AS due
                     WHERE due.state IN ('PENDING', 'RETRYING')
                       AND due.concurrency_key IS NOT NULL
                       AND due.queue = k.queue AND due.concurrency_key = k.concurrency_key
                       AND due.run_at <= now() AND due.type = ANY($2::text[])
                 )
           THEN pg_try_advisory_xact_lock({KEY_LOCKS},
                                          hashtext(k.queue || E'\\x1f' || k.concurrency_key))
           ELSE false END AS held
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

# The first statement of a limited claim: take the turns it will claim in.
# $1 queues (NULL: all), $2 types, $3 at most this many jobs, $4/$5 the (queue,
# key) the worker's previous limited claim's walk ended at ('', '': none, before
# every key: no queue name is empty).
#
# `keys` walks jobs_keyed_claim_idx from the key after $4/$5 to each (queue, key)
# with waiting jobs, round the end to the first, and stops once it holds $3 keys
# (each gives at least one job) or is back where it began: a claim visits about
# as many keys as it takes jobs, however many wait, and the next claim goes on
# from where this one ended (`walked`). A running-limited queue is held when it
# is served and has a due unkeyed job or a held key; a rate limit when it has a
# token and a due unkeyed job of a type served, or names a due job of a held key.
_TAKE_TURNS = f"""
WITH RECURSIVE keys AS (
    SELECT k.queue, k.concurrency_key, k.wrapped, o.held, o.held::int AS found, 1 AS step
    FROM ({_NEXT_KEY.format(wrapped="false", after="($4::text, $5::text)", may_wrap="true")}) AS k {
    _KEY_HELD
}
    UNION ALL
    SELECT k.queue, k.concurrency_key, k.wrapped, o.held, keys.found + o.held::int,
           keys.step + 1
    FROM keys CROSS JOIN LATERAL ({
    _NEXT_KEY.format(
        wrapped="keys.wrapped",
        after="(keys.queue, keys.concurrency_key)",
        may_wrap="NOT keys.wrapped",
    )
}) AS k {_KEY_HELD}
    WHERE keys.found < $3
      AND NOT (k.wrapped AND (k.queue, k.concurrency_key) > ($4::text, $5::text))
), held_keys AS (
    SELECT queue, concurrency_key FROM keys WHERE held
), held_queues AS (
    SELECT name FROM (
        SELECT name, pg_try_advisory_xact_lock({QUEUE_LOCKS}, hashtext(name)) AS held
        FROM queues
        WHERE running_limit IS NOT NULL AND paused_at IS NULL
          AND ($1::text[] IS NULL OR name = ANY($1::text[]))
          AND (EXISTS (SELECT 1 FROM held_keys WHERE held_keys.queue = queues.name)
               OR EXISTS (
                   SELECT 1 FROM jobs CROSS JOIN unnest($2::text[]) AS served(type)
                   WHERE {_WAITING} AND concurrency_key IS NULL AND rate_limit IS NULL
                     AND jobs.queue = queues.name AND jobs.type = served.type
                     AND run_at <= now()
               ))
        OFFSET 0
    ) AS tried WHERE held
), clock AS (
    SELECT clock_timestamp() AS at
), key_limits AS (
    -- The rate limits the held keys' next jobs name (none read without limits).
    SELECT DISTINCT due.rate_limit FROM held_keys CROSS JOIN LATERAL (
        SELECT rate_limit FROM jobs
        WHERE {_WAITING} AND concurrency_key IS NOT NULL
          AND queue = held_keys.queue AND concurrency_key = held_keys.concurrency_key
          AND run_at <= now() AND type = ANY($2::text[])
        ORDER BY priority DESC, run_at, id
        LIMIT $3
    ) AS due
    WHERE due.rate_limit IS NOT NULL AND EXISTS (SELECT 1 FROM rate_limits)
), held_buckets AS (
    SELECT name FROM (
        SELECT name, pg_try_advisory_xact_lock({BUCKET_LOCKS}, hashtext(name)) AS held
        FROM rate_limits CROSS JOIN clock
        WHERE {_AVAILABLE} >= 1
          AND (name IN (SELECT rate_limit FROM key_limits)
               OR EXISTS (
                   SELECT 1 FROM jobs
                   WHERE {_WAITING} AND concurrency_key IS NULL
                     AND rate_limit = rate_limits.name
                     AND run_at <= now() AND type = ANY($2::text[])
                     AND ($1::text[] IS NULL OR queue = ANY($1::text[]))
               ))
        OFFSET 0
    ) AS tried WHERE held
), walked AS (
    SELECT queue, concurrency_key FROM keys ORDER BY step DESC LIMIT 1
)
SELECT ARRAY(SELECT queue FROM held_keys) AS key_queues,
       ARRAY(SELECT concurrency_key FROM held_keys) AS keys,
       ARRAY(SELECT name FROM held_queues) AS queues,
       ARRAY(SELECT name FROM held_buckets) AS buckets,
       (SELECT queue FROM walked) AS walked_queue,
       (SELECT concurrency_key FROM walked) AS walked_key
"""

# The second statement: with a snapshot taken after the turns, so every claim
# that held one of them before has committed and its jobs and tokens are seen,
# claim within what each held limit has left. $1 queues, $2 types, $3 at most
# this many, $4 the worker, $5 lease, $6/$7 the held keys (queues, keys), $8 the
# held running-limited queues, $9 the held rate limits.
#
# `room` is each held key's room, `limited` each running-limited queue's (none
# unless held: a job in a queue another claim holds is passed over), `unkeyed`
# their jobs without key or rate limit (jobs_claim_idx, per type). `buckets` is
# what each held rate limit holds, `rated` the jobs with a rate limit and no key
# (jobs_rated_claim_idx); a job whose limit is not held finds no bucket and is
# passed over. `turns` keeps, of all those candidates, the ones every limit has
# room for; `spent` takes their tokens.
_CLAIM_LIMITED = f"""
WITH held AS (
    SELECT * FROM unnest($6::text[], $7::text[]) AS held(queue, concurrency_key)
), room AS (
    SELECT k.queue, k.concurrency_key, r.free FROM held AS k {_KEY_FREE}
    WHERE r.free > 0 AND NOT EXISTS (
        SELECT 1 FROM queues WHERE queues.name = k.queue AND queues.paused_at IS NOT NULL
    )
), clock AS (
    SELECT clock_timestamp() AS at
), share AS (
    -- Twice the turns $3 needs if every key with room had that many jobs: keys
    -- with fewer leave room to the others, mostly.
    SELECT ceil(2 * $3::numeric / greatest(1, count(*)))::int AS turns FROM room
), limited AS (
    SELECT queues.name AS queue,
           CASE WHEN queues.name = ANY($8::text[]) AND queues.paused_at IS NULL
                THEN queues.running_limit - (SELECT count(*) FROM jobs AS running
                                             WHERE running.state = 'RUNNING'
                                               AND running.queue = queues.name)
                ELSE 0 END AS free
    FROM queues
    WHERE queues.running_limit IS NOT NULL
), buckets AS (
    SELECT name, {_AVAILABLE} AS available
    FROM rate_limits CROSS JOIN clock
    WHERE name = ANY($9::text[])
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
)
SELECT * FROM moved
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
    type_list = list(types)
    after = ("", "") if round_ is None or round_.after is None else round_.after
    await conn.execute("BEGIN")
    try:
        turns = await conn.fetchrow(_TAKE_TURNS, queue_list, type_list, limit, *after)
        rows = []
        if turns["keys"] or turns["queues"] or turns["buckets"]:
            rows = await conn.fetch(
                _CLAIM_LIMITED,
                queue_list,
                type_list,
                limit,
                worker_id,
                lease_s,
                turns["key_queues"],
                turns["keys"],
                turns["queues"],
                turns["buckets"],
            )
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")
        raise
    # The turns are held to here: a claim after us on one of them sees our jobs.
    await conn.execute("COMMIT")
    if round_ is not None:
        walked = turns["walked_queue"]
        round_.after = None if walked is None else (walked, turns["walked_key"])
    jobs = [Job.from_row(row) for row in rows]
    jobs.sort(key=lambda job: (-job.priority, job.run_at, job.id))
    return jobs


async def take_bucket_turn(conn: Conn, name: str) -> None:
    """Wait for the turn of rate limit ``name`` (to the end of ``conn``'s
    transaction): a change of its bucket must not race a claim's spend."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", BUCKET_LOCKS, name)


async def any_waiting(conn: Conn) -> bool:
    """Whether any limited job is due (a probe of each index they wait in)."""
    return bool(await conn.fetchval(_ANY_WAITING))
