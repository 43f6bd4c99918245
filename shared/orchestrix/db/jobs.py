"""Every query on the ``jobs`` table, one named function each.

Functions take a connection (or pool) so the caller owns the transaction. Every
update names the state it expects to move from (see ``orchestrix.states``): zero
rows updated means someone else moved the job first, and the caller must not
overwrite it.

A worker's writes about a run also name the worker (``worker_id``): a
hand-back gives the attempt number back, so the next run of the job has the
same (id, attempt), and only the worker tells two runs apart. A late or retried
write of the first run must not touch the second. ``worker_id`` None skips that
check, for tests and tools that move a job on no worker's behalf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix import ids
from orchestrix.db.dependencies import RELEASED, WAKE
from orchestrix.db.events import REQUEST_KEY, SESSION_ACTOR, WORKER_ACTOR, recorded
from orchestrix.db.pool import encode_json
from orchestrix.models import Job, NewJob
from orchestrix.states import CANCELLABLE_AT_ONCE, JobState

# asyncpg ships no type information: a Connection or a Pool, both answer fetch*.
Conn = Any

# Every statement that moves a job writes the move's event with it (db.events):
# a CTE `moved` (or `created`) returns the rows, `recorded` writes their events.
# A job created for an API key names it (the creates of several requests, and
# so of several keys, share one statement: the key travels with each row).
_CREATED = recorded(
    "created", from_state="NULL::text", actor=f"COALESCE('key:' || created_by_key, {SESSION_ACTOR})"
)

_INSERT = f"""
WITH created AS (
    INSERT INTO jobs (id, type, queue, payload, priority, max_attempts, run_at,
                      timeout_seconds, idempotency_key, concurrency_key, rate_limit,
                      created_by_key)
    VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, now()), $8, $9, $10, $11, $12)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), {_CREATED}
SELECT * FROM created
"""

_BY_ID = "SELECT * FROM jobs WHERE id = $1"

_BY_IDEMPOTENCY_KEY = "SELECT * FROM jobs WHERE idempotency_key = $1"

# What three moves write, shared with the bulk actions (db.bulk).
# Both name the request's API key (the first cancel request's, for a running job).
CANCEL_SET = (
    "state = 'CANCELLED', completed_at = now(), waiting_for = 0, updated_at = now(),"
    f" cancelled_by_key = {REQUEST_KEY}"
)
REQUEST_CANCEL_SET = (
    "cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now(),"
    " cancelled_by_key = CASE WHEN cancel_requested_at IS NULL"
    f" THEN {REQUEST_KEY} ELSE cancelled_by_key END"
)
# An operator's retry of a finished job: PENDING and due now, with a new budget of
# attempts; its errors stay.
# A workflow's job sets its state by its parents instead (db.workflows.retry).
RETRY_BY_HAND_RESET = """attempt = 0, run_at = now(), completed_at = NULL,
    scheduled_at = NULL, started_at = NULL, lease_expires_at = NULL,
    cancel_requested_at = NULL, handoffs = 0, result = NULL, worker_id = NULL,
    updated_at = now()"""
RETRY_BY_HAND_SET = f"state = 'PENDING', {RETRY_BY_HAND_RESET}"

# `old` locks the job and reads the state it moves from, for its event.
_CANCEL = f"""
WITH old AS (SELECT id, state FROM jobs WHERE id = $1 AND state = ANY($2::text[]) FOR UPDATE),
moved AS (
    UPDATE jobs
    SET {CANCEL_SET}
    FROM old
    WHERE jobs.id = old.id AND jobs.state = ANY($2::text[])
    RETURNING jobs.*, old.state AS from_state
), {recorded("moved", from_state="from_state", actor=SESSION_ACTOR)}
SELECT * FROM moved
"""


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
            new.concurrency_key,
            new.rate_limit,
            new.created_by_key,
        )
        if row is not None:
            return Job.from_row(row), True
        existing = await conn.fetchrow(_BY_IDEMPOTENCY_KEY, new.idempotency_key)
        if existing is not None:
            return Job.from_row(existing), False
    raise RuntimeError(f"idempotency key {new.idempotency_key!r} conflicts but has no job")


_INSERT_MANY = f"""
WITH created AS (
    INSERT INTO jobs (id, type, queue, payload, priority, max_attempts, run_at,
                      timeout_seconds, idempotency_key, concurrency_key, rate_limit,
                      created_by_key)
    SELECT id, type, queue, payload::jsonb, priority, max_attempts, COALESCE(run_at, now()),
           timeout_seconds, idempotency_key, concurrency_key, rate_limit, created_by_key
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                $7::timestamptz[], $8::int[], $9::text[], $10::text[], $11::text[],
                $12::text[])
         AS new(id, type, queue, payload, priority, max_attempts, run_at, timeout_seconds,
                idempotency_key, concurrency_key, rate_limit, created_by_key)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), {_CREATED}
SELECT * FROM created
"""

_BY_IDEMPOTENCY_KEYS = "SELECT * FROM jobs WHERE idempotency_key = ANY($1::text[])"


async def insert_many(conn: Conn, batch: Sequence[NewJob]) -> list[tuple[Job, bool]]:
    """Create jobs in one statement: all of them or, on error, none.

    Returns each job (in the order given) and whether this call created it: a job
    whose idempotency key was used before, in the table or earlier in ``batch``, is
    that earlier job, as with ``insert``.
    """
    firsts: dict[str, NewJob] = {}
    for new in batch:
        if new.idempotency_key is not None:
            firsts.setdefault(new.idempotency_key, new)
    # A key repeated within the batch is inserted once, with its first job's fields.
    batch_in = [n for n in batch if n.idempotency_key is None or firsts[n.idempotency_key] is n]
    results_in = await _insert_unique(conn, batch_in)
    if len(batch_in) == len(batch):  # no key repeated: nothing to share out
        return results_in
    by_key = {
        new.idempotency_key: job
        for new, (job, _) in zip(batch_in, results_in, strict=True)
        if new.idempotency_key is not None
    }
    by_new = {id(new): result for new, result in zip(batch_in, results_in, strict=True)}
    return [
        by_new[id(new)] if id(new) in by_new else (by_key[new.idempotency_key or ""], False)
        for new in batch
    ]


async def _insert_unique(conn: Conn, batch: Sequence[NewJob]) -> list[tuple[Job, bool]]:
    """``insert_many`` for a batch whose idempotency keys do not repeat."""
    job_ids = [ids.new_id() for _ in batch]
    columns = (
        job_ids,
        [new.type for new in batch],
        [new.queue for new in batch],
        # As JSON text: asyncpg checks each element of a jsonb[] for being a nested
        # array (four isinstance calls against abstract classes, 1 µs a job).
        [encode_json(new.payload) for new in batch],
        [new.priority for new in batch],
        [new.max_attempts for new in batch],
        [new.run_at for new in batch],
        [new.timeout_seconds for new in batch],
        [new.idempotency_key for new in batch],
        [new.concurrency_key for new in batch],
        [new.rate_limit for new in batch],
        [new.created_by_key for new in batch],
    )
    created = {row["id"]: Job.from_row(row) for row in await conn.fetch(_INSERT_MANY, *columns)}
    earlier: dict[str, Job] = {}
    if len(created) < len(batch):
        keys = [
            new.idempotency_key
            for new, job_id in zip(batch, job_ids, strict=True)
            if job_id not in created
        ]
        for row in await conn.fetch(_BY_IDEMPOTENCY_KEYS, keys):
            earlier[row["idempotency_key"]] = Job.from_row(row)
    results: list[tuple[Job, bool]] = []
    for new, job_id in zip(batch, job_ids, strict=True):
        if job_id in created:
            results.append((created[job_id], True))
        else:
            assert new.idempotency_key is not None  # only a key can conflict
            results.append((earlier[new.idempotency_key], False))
    return results


async def get(conn: Conn, job_id: str) -> Job | None:
    row = await conn.fetchrow(_BY_ID, job_id)
    return None if row is None else Job.from_row(row)


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    type: str | None = None
    queue: str | None = None


# The fields a list leaves out unless asked for: each may hold a megabyte or more
# (payload up to API_MAX_BODY_BYTES, a result up to 1 MiB, an error text per attempt).
LARGE_FIELDS = ("payload", "result", "errors", "progress")
# Every column a Job is read from, in the dataclass's order (Job.from_row reads each).
_JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(Job))


def list_query(
    where: JobFilter,
    *,
    limit: int,
    before: str | None,
    include: Collection[str] = LARGE_FIELDS,
) -> tuple[str, list[Any]]:
    """The SQL and arguments of ``list_jobs``, for it and for the plan tests.

    Each combination of filters names the index it walks, backwards from the
    cursor: the last filter of ``state``, ``type``, ``queue`` given with ``id``
    (the indexes of migrations 0001 and 0012: ``(state, id)``, ``(type, id)``,
    ``(queue, id)``), bounded by two row comparisons, ``(queue, id) > ($2, '')``
    and ``< ($2, cursor)``, the others equalities checked on each row; the ORDER
    BY is that index's order. Equality alone (``queue = $1 ... ORDER BY id DESC``)
    would let the planner walk the primary key instead and check the filters on
    each row: cheap while the matches are spread evenly over time, but the whole
    table for a queue whose jobs are old, and a generic plan (asyncpg prepares
    every statement) guesses the average queue. The bounds are exact: the scan
    starts at the cursor and stops at the first row past its filter. ``type``
    with ``queue`` walks the type's index and checks the queue. No combination
    has an index of its own (see 0012: each costs every state change an entry).

    A large field not in ``include`` is read as NULL: PostgreSQL then never
    fetches (or decompresses) its TOAST data.
    """
    given = {
        column: value
        for column, value in (
            ("state", where.state.value if where.state else None),
            ("type", where.type),
            ("queue", where.queue),
        )
        if value is not None
    }
    # type with queue has no index of its own: the type's index, checking the queue.
    checked = ["queue"] if "type" in given and "queue" in given else []
    # The index's last filter column is walked (with id); those before it are equal.
    indexed = [column for column in given if column not in checked]
    walked = indexed.pop() if indexed else None
    clauses: list[str] = []
    args: list[Any] = []
    for column in [*indexed, *checked]:
        args.append(given[column])
        clauses.append(f"{column} = ${len(args)}")
    if walked is not None:
        args.append(given[walked])
        value = f"${len(args)}"
        # No id sorts below '' or above '8' (a ULID starts with 0 to 7; id is C-collated).
        args.append(before if before is not None else "8")
        clauses.append(f"({walked}, id) > ({value}, '')")
        clauses.append(f"({walked}, id) < ({value}, ${len(args)})")
    elif before is not None:
        args.append(before)
        clauses.append(f"id < ${len(args)}")
    args.append(limit)
    columns = ", ".join(
        f"NULL::jsonb AS {name}" if name in LARGE_FIELDS and name not in include else name
        for name in _JOB_COLUMNS
    )
    sql = f"SELECT {columns} FROM jobs"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    order = "id DESC" if walked is None else f"{walked} DESC, id DESC"
    sql += f" ORDER BY {order} LIMIT ${len(args)}"
    return sql, args


async def list_jobs(
    conn: Conn,
    where: JobFilter,
    *,
    limit: int,
    before: str | None,
    include: Collection[str] = LARGE_FIELDS,
) -> list[Job]:
    """Up to ``limit`` jobs newest first, with ids below ``before`` (keyset).

    The large fields not in ``include`` are None on the jobs returned.
    """
    sql, args = list_query(where, limit=limit, before=before, include=include)
    return [Job.from_row(row) for row in await conn.fetch(sql, *args)]


async def cancel(conn: Conn, job_id: str) -> Job | None:
    """Cancel a job that has not started; None when it is gone or past that point."""
    row = await conn.fetchrow(_CANCEL, job_id, [s.value for s in CANCELLABLE_AT_ONCE])
    return None if row is None else Job.from_row(row)


# --- the pipeline: a worker claims, runs and finishes ---------------------------


# A claim for one worker: up to $3 due jobs of the queues ($1, NULL for all) and
# types ($2) it serves, moved to RUNNING for it at once. Jobs with a concurrency
# key or a rate limit are not this claim's (jobs_claim_idx holds none), nor are
# the jobs of a queue with a running limit: db.concurrency claims those.
#
# `pairs` skips through jobs_claim_idx to each (queue, type) that has waiting
# jobs: one index probe per pair, however long the backlog. For each pair the
# worker serves, `due` walks its jobs in priority order (SKIP LOCKED: claims of
# other workers go past each other). The jobs of a queue take turns in priority
# order, and the queues take turns with each other: with two queues backlogged,
# each gets half the slots, and a quiet queue's job goes in the first turn.
# A paused queue (db.queues) is passed over, and so is a queue with a running
# limit: one primary-key probe per pair.
# The end of a claim, shared with the limited claim (db.concurrency): `turns`
# (id, priority, run_at, state, turn) ranked; the first $3 by turn start for
# worker $4, leased for $5 s, with their events, in `moved`. ``at`` is the start's
# time: the transaction's, or for the limited claim the clock read after its turn.
# With ``lock`` the chosen jobs are locked (SKIP LOCKED) and checked to wait still,
# for a claim whose candidates were read without locks.
def start_chosen(at: str = "now()", *, lock: bool = False) -> str:
    picked = "chosen"
    locking = ""
    if lock:
        picked = "picked"
        locking = """, picked AS (
    SELECT jobs.id, chosen.state FROM jobs JOIN chosen ON chosen.id = jobs.id
    WHERE jobs.state IN ('PENDING', 'RETRYING')
    FOR UPDATE OF jobs SKIP LOCKED
)"""
    return f"""chosen AS (
    SELECT id, state FROM turns ORDER BY turn, priority DESC, run_at, id LIMIT $3
){locking}, moved AS (
    UPDATE jobs
    SET state = 'RUNNING', attempt = jobs.attempt + 1, worker_id = $4,
        scheduled_at = {at}, started_at = {at}, updated_at = {at},
        lease_expires_at = {at} + make_interval(secs => $5)
    FROM {picked}
    WHERE jobs.id = {picked}.id
    RETURNING jobs.*, {picked}.state AS from_state
), {recorded("moved", from_state="from_state", actor=WORKER_ACTOR, at=at)}"""


_CLAIM = f"""
WITH RECURSIVE pairs AS (
    (SELECT queue, type FROM jobs
     WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NULL AND rate_limit IS NULL
     ORDER BY queue, type LIMIT 1)
    UNION ALL
    SELECT next.queue, next.type FROM pairs CROSS JOIN LATERAL (
        SELECT queue, type FROM jobs
        WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NULL AND rate_limit IS NULL
          AND (queue, type) > (pairs.queue, pairs.type)
        ORDER BY queue, type LIMIT 1
    ) AS next
), candidates AS (
    SELECT due.* FROM pairs CROSS JOIN LATERAL (
        SELECT id, queue, priority, run_at, state FROM jobs
        WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NULL AND rate_limit IS NULL
          AND queue = pairs.queue AND type = pairs.type
          AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS due
    WHERE ($1::text[] IS NULL OR pairs.queue = ANY($1::text[])) AND pairs.type = ANY($2::text[])
      AND NOT EXISTS (
          SELECT 1 FROM queues
          WHERE queues.name = pairs.queue
            AND (queues.paused_at IS NOT NULL OR queues.running_limit IS NOT NULL)
      )
), turns AS (
    SELECT id, priority, run_at, state,
           row_number() OVER (PARTITION BY queue ORDER BY priority DESC, run_at, id) AS turn
    FROM candidates
), {start_chosen()}
SELECT * FROM moved
"""

# The sessions that claim (workers) and maintain (schedulers).
#
# Each claim and maintenance query walks a partial index in order and stops
# after its LIMIT. Right after a burst of inserts, before autovacuum has
# analyzed the table, the planner believes few jobs are due and sorts all of
# them instead: 45 ms instead of 10 ms for a claim of 500 from 100,000 due jobs,
# growing with the backlog. With sorting off, the index order wins. Their UPDATE
# then joins the few rows it picked back to `jobs`; on tables of about 20,000 to
# 100,000 rows the planner hashed the whole table for that (20 ms instead of 6
# for a claim of 500 at 70,000 rows). With hash and merge joins off it looks each
# row up by primary key. The penalty that "off" puts on a sort (the claim still
# sorts its few candidates) makes the estimated cost huge, and JIT would then
# compile the claim at each execution (200 ms instead of 2): JIT is off too.
# As settings of the session, not of each transaction, they cost no round trip.
CLAIM_SERVER_SETTINGS = {
    "enable_sort": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "jit": "off",
}

# The events of a worker's moves out of RUNNING: the attempt that ran ends.
_FROM_RUNNING = recorded("moved", from_state="'RUNNING'", actor=WORKER_ACTOR)

# A success also releases the job's children, if it has any (db.dependencies).
_SUCCEED = f"""
WITH moved AS (
    UPDATE jobs
    SET state = 'SUCCEEDED', result = $3, completed_at = now(), updated_at = now()
    WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
      AND ($4::text IS NULL OR worker_id = $4)
    RETURNING *
), {_FROM_RUNNING}, {RELEASED}
SELECT * FROM moved WHERE {WAKE}
"""


# Each failed attempt's error is appended to `errors`, its time in RFC 3339 UTC
# like every other time the API shows; `last_error` repeats the newest. The
# attempt is named by table: _TAKE_BACK joins a batch that has an `attempt` too.
def _error_entry(param: str) -> str:
    return f"""jsonb_build_object(
        'attempt', jobs.attempt, 'error', {param}::text,
        'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))"""


_ERROR_ENTRY = _error_entry("$3")

# A cancellation asked for while the attempt ran (DELETE answered 202) outlives
# the attempt: instead of another attempt the job ends CANCELLED, as when the
# rescuer takes it. A failure for good or a success stands.
_RETRY = f"""
WITH moved AS (
    UPDATE jobs
    SET state = CASE WHEN cancel_requested_at IS NULL THEN 'RETRYING' ELSE 'CANCELLED' END,
        run_at = CASE WHEN cancel_requested_at IS NULL
                      THEN now() + make_interval(secs => $4) ELSE run_at END,
        completed_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE now() END,
        last_error = $3,
        errors = errors || jsonb_build_array({_ERROR_ENTRY}),
        lease_expires_at = NULL, handoffs = 0, updated_at = now()
    WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
      AND ($5::text IS NULL OR worker_id = $5)
    RETURNING *
), {_FROM_RUNNING}
SELECT * FROM moved
"""

_FAIL = f"""
WITH moved AS (
    UPDATE jobs
    SET state = 'FAILED', last_error = $3, completed_at = now(), updated_at = now(),
        errors = errors || jsonb_build_array({_ERROR_ENTRY}), lease_expires_at = NULL
    WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
      AND ($4::text IS NULL OR worker_id = $4)
    RETURNING *
), {_FROM_RUNNING}
SELECT * FROM moved
"""

# A worker returns an attempt it must stop before it is done: the attempt is not
# counted and the job is due at once for any worker. A job whose cancellation
# was asked for ends CANCELLED instead. `handoffs` counts hand-backs in a row;
# the worker decides (with `hand_back`'s limit) when one counts as a failure.
# Their event names the attempt that ran ($2), not the one given back.
_FROM_RUNNING_UNCOUNTED = recorded(
    "moved", from_state="'RUNNING'", attempt="$2::int", actor=WORKER_ACTOR
)


def _give_back(*, handoffs: str, run_at: str) -> str:
    """RUNNING -> PENDING with the attempt not counted (CANCELLED if a cancel was
    asked for): a hand-back or a snooze, which differ in ``handoffs`` and the
    ``run_at`` they set (SQL expressions)."""
    return f"""
WITH moved AS (
    UPDATE jobs
    SET state = CASE WHEN cancel_requested_at IS NULL THEN 'PENDING' ELSE 'CANCELLED' END,
        completed_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE now() END,
        attempt = CASE WHEN cancel_requested_at IS NULL THEN attempt - 1 ELSE attempt END,
        handoffs = {handoffs},
        run_at = CASE WHEN cancel_requested_at IS NULL THEN {run_at} ELSE run_at END,
        started_at = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
      AND ($4::text IS NULL OR worker_id = $4)
    RETURNING id, state, queue, type, worker_id, workflow_id
), {_FROM_RUNNING_UNCOUNTED}
SELECT state FROM moved
"""


_HAND_BACK = _give_back(handoffs="handoffs + $3::int", run_at="now()")

# An executor asked to run again later (a snooze): like a hand-back, the attempt
# is not counted, but the job is due only after $3 s, and hand-backs start over.
_SNOOZE = _give_back(handoffs="0", run_at="now() + make_interval(secs => $3)")

# The workers are woken as for a new job. The event names the attempt the job
# had reached; the new budget starts from 0.
_RETRY_BY_HAND = f"""
WITH old AS (
    SELECT id, state, attempt FROM jobs
    WHERE id = $1 AND state IN ('FAILED', 'CANCELLED') AND workflow_id IS NULL FOR UPDATE
), moved AS (
    UPDATE jobs
    SET {RETRY_BY_HAND_SET}
    FROM old
    WHERE jobs.id = old.id AND jobs.state IN ('FAILED', 'CANCELLED')
    RETURNING jobs.*, old.state AS from_state, old.attempt AS from_attempt
), {recorded("moved", from_state="from_state", attempt="from_attempt", actor=SESSION_ACTOR)}
SELECT moved.*, pg_notify('orchestrix_jobs', '') FROM moved
"""

# A waiting job whose run_at is still ahead becomes due now.
_RUN_NOW = """
WITH moved AS (
    UPDATE jobs SET run_at = now(), updated_at = now()
    WHERE id = $1 AND state IN ('PENDING', 'RETRYING') AND run_at > now()
    RETURNING *
)
SELECT moved.*, pg_notify('orchestrix_jobs', '') FROM moved
"""

# The latest progress of running attempts, one statement for all of a worker's.
_PROGRESS = """
UPDATE jobs SET progress = p.progress::jsonb, progress_at = now()
FROM unnest($1::text[], $2::int[], $3::text[]) AS p(id, attempt, progress)
WHERE jobs.id = p.id AND jobs.attempt = p.attempt AND jobs.state = 'RUNNING'
  AND ($4::text IS NULL OR jobs.worker_id = $4)
"""

# Jobs RUNNING for a worker that does not know it runs them: a claim whose
# commit the worker never saw (the connection broke after the server committed).
# Only claims older than $3 s: a claim that is answering right now is not one.
_ORPHANS = """
SELECT id, attempt FROM jobs
WHERE worker_id = $1 AND state = 'RUNNING' AND NOT (id = ANY($2::text[]))
  AND started_at < now() - make_interval(secs => $3)
"""

_WAITING_BY_QUEUE = """
SELECT queue, count(*) AS n, min(run_at) FILTER (WHERE run_at <= now()) AS oldest_due
FROM jobs
WHERE state IN ('PENDING', 'RETRYING')
GROUP BY queue
"""


# Due jobs waiting, per (queue, type): one pass over the claim index.
async def claim(
    conn: Conn,
    *,
    worker_id: str,
    queues: Sequence[str] | None,
    types: Sequence[str],
    limit: int,
    lease_s: float,
) -> list[Job]:
    """Move up to ``limit`` due jobs of these queues (None: all) and types to RUNNING
    for ``worker_id``, leased for ``lease_s``: by priority within a queue, the
    queues taking turns.

    SKIP LOCKED lets any number of workers claim at once: each job goes to one.
    Run it on a connection opened with :data:`CLAIM_SERVER_SETTINGS`.
    """
    if limit <= 0 or not types:
        return []
    queue_list = None if queues is None else list(queues)
    rows = await conn.fetch(_CLAIM, queue_list, list(types), limit, worker_id, lease_s)
    jobs = [Job.from_row(row) for row in rows]
    jobs.sort(key=lambda job: (-job.priority, job.run_at, job.id))
    return jobs


async def hand_back(
    conn: Conn, job_id: str, attempt: int, *, counted: bool = True, worker_id: str | None = None
) -> JobState | None:
    """RUNNING → PENDING, the attempt not counted (CANCELLED if a cancel was asked
    for); None when the job had moved on. ``counted`` adds one to ``handoffs``."""
    state = await conn.fetchval(_HAND_BACK, job_id, attempt, 1 if counted else 0, worker_id)
    return None if state is None else JobState(state)


async def retry_by_hand(conn: Conn, job_id: str) -> Job | None:
    """FAILED or CANCELLED → PENDING, due now, attempts counted from 0 again; None
    when the job is in another state, is a workflow's (db.workflows.retry), or
    does not exist."""
    row = await conn.fetchrow(_RETRY_BY_HAND, job_id)
    return None if row is None else Job.from_row(row)


async def run_now(conn: Conn, job_id: str) -> Job | None:
    """Make a waiting job due now; None when it is not waiting for a later run_at."""
    row = await conn.fetchrow(_RUN_NOW, job_id)
    return None if row is None else Job.from_row(row)


async def snooze(
    conn: Conn, job_id: str, attempt: int, delay_s: float, *, worker_id: str | None = None
) -> JobState | None:
    """RUNNING → PENDING, due in ``delay_s``, the attempt not counted (CANCELLED if a
    cancel was asked for); None when the job had moved on."""
    state = await conn.fetchval(_SNOOZE, job_id, attempt, delay_s, worker_id)
    return None if state is None else JobState(state)


async def write_progress(
    conn: Conn, reports: Sequence[tuple[str, int, str]], *, worker_id: str | None = None
) -> None:
    """Store each running attempt's latest progress: (id, attempt, JSON text)."""
    if reports:
        ids_, attempts, values = zip(*reports, strict=True)
        await conn.execute(_PROGRESS, list(ids_), list(attempts), list(values), worker_id)


async def orphans(
    conn: Conn, worker_id: str, known: Sequence[str], *, older_than_s: float
) -> list[tuple[str, int]]:
    """(id, attempt) of jobs RUNNING for ``worker_id``, claimed more than
    ``older_than_s`` ago, other than ``known``."""
    rows = await conn.fetch(_ORPHANS, worker_id, list(known), older_than_s)
    return [(row["id"], row["attempt"]) for row in rows]


# The batched updates below find their rows by primary key, one lookup per
# (id, attempt) they are given; the state is only their guard. Written as
# `state = ...`, the guard lets the planner scan a partial index of that state
# instead (jobs_running_lease_idx) and hash-join the batch against every job in
# the state. After a burst the table's statistics say that state is nearly
# empty, so the planner does so: each write of 100 jobs then read all 20,000
# running ones, and the drain with a million finished jobs ran 88 % slower.
# `state || ''` matches no index.
_SUCCEED_MANY = f"""
WITH moved AS (
    UPDATE jobs
    SET state = 'SUCCEEDED', result = done.result, completed_at = now(), updated_at = now()
    FROM unnest($1::text[], $2::int[], $3::jsonb[]) AS done(id, attempt, result)
    WHERE jobs.id = done.id AND jobs.attempt = done.attempt AND jobs.state || '' = 'RUNNING'
      AND ($4::text IS NULL OR jobs.worker_id = $4)
    RETURNING jobs.id, jobs.state, jobs.attempt, jobs.queue, jobs.type, jobs.worker_id,
              jobs.workflow_id
), {_FROM_RUNNING}, {RELEASED}
SELECT id FROM moved WHERE {WAKE}
"""


async def succeed_many(
    conn: Conn, outcomes: Sequence[tuple[str, int, Any]], *, worker_id: str | None = None
) -> list[bool]:
    """``succeed`` for many (job id, attempt, result) in one statement: whether each
    was written (False: the job had moved on)."""
    rows = await conn.fetch(
        _SUCCEED_MANY,
        [o[0] for o in outcomes],
        [o[1] for o in outcomes],
        [o[2] for o in outcomes],
        worker_id,
    )
    written = {row["id"] for row in rows}
    return [job_id in written for job_id, _, _ in outcomes]


async def succeed(
    conn: Conn, job_id: str, attempt: int, result: Any, *, worker_id: str | None = None
) -> Job | None:
    row = await conn.fetchrow(_SUCCEED, job_id, attempt, result, worker_id)
    return None if row is None else Job.from_row(row)


async def retry(
    conn: Conn,
    job_id: str,
    attempt: int,
    error: str,
    delay_s: float,
    *,
    worker_id: str | None = None,
) -> Job | None:
    """RUNNING → RETRYING, due again in ``delay_s``; CANCELLED instead when a
    cancellation was asked for. None when the job had moved on."""
    row = await conn.fetchrow(_RETRY, job_id, attempt, error, delay_s, worker_id)
    return None if row is None else Job.from_row(row)


async def fail(
    conn: Conn, job_id: str, attempt: int, error: str, *, worker_id: str | None = None
) -> Job | None:
    row = await conn.fetchrow(_FAIL, job_id, attempt, error, worker_id)
    return None if row is None else Job.from_row(row)


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    waiting: int
    oldest_due: datetime | None


async def waiting_by_queue(conn: Conn) -> list[QueueDepth]:
    """Jobs not yet running, per queue, and when the longest-waiting due one became due."""
    rows = await conn.fetch(_WAITING_BY_QUEUE)
    return [QueueDepth(row["queue"], row["n"], row["oldest_due"]) for row in rows]


# --- recovery: leases, rescue, cancelling running jobs ------------------------

_RENEW_LEASES = """
UPDATE jobs
SET lease_expires_at = now() + make_interval(secs => $3)
FROM unnest($1::text[], $2::int[]) AS mine(id, attempt)
-- By primary key, as _SUCCEED_MANY.
WHERE jobs.id = mine.id AND jobs.attempt = mine.attempt AND jobs.state || '' = 'RUNNING'
  AND ($4::text IS NULL OR jobs.worker_id = $4)
RETURNING jobs.id, jobs.cancel_requested_at IS NOT NULL AS cancel
"""

# Running jobs whose lease ran out more than $2 s ago, locked for `take_back`.
_LOST_BY_LEASE = """
SELECT id, type, queue, attempt, max_attempts, cancel_requested_at IS NOT NULL AS cancel
FROM jobs
WHERE state = 'RUNNING' AND lease_expires_at < now() - make_interval(secs => $2)
ORDER BY lease_expires_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# Running jobs of workers that are gone, locked for `take_back`.
_LOST_BY_WORKER = """
SELECT id, type, queue, attempt, max_attempts, cancel_requested_at IS NOT NULL AS cancel
FROM jobs
WHERE state = 'RUNNING' AND worker_id = ANY($1::text[])
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

# The rescuer's decision for each lost attempt: RETRYING after a delay,
# FAILED, or CANCELLED (a cancel was asked for). By primary key, as _SUCCEED_MANY.
# Its events name the rescuer or lifeline that took the attempts back ($6).
_TAKE_BACK = f"""
WITH moved AS (
    UPDATE jobs
    SET state = lost.state,
        run_at = CASE WHEN lost.state = 'RETRYING'
                      THEN now() + make_interval(secs => lost.delay_s) ELSE run_at END,
        completed_at = CASE WHEN lost.state = 'RETRYING' THEN NULL ELSE now() END,
        last_error = $5,
        errors = errors || jsonb_build_array({_error_entry("$5")}),
        lease_expires_at = NULL, handoffs = 0, updated_at = now()
    FROM unnest($1::text[], $2::int[], $3::text[], $4::float8[])
         AS lost(id, attempt, state, delay_s)
    WHERE jobs.id = lost.id AND jobs.attempt = lost.attempt AND jobs.state || '' = 'RUNNING'
    RETURNING jobs.id, jobs.type, jobs.queue, jobs.attempt, jobs.state, jobs.workflow_id
), {recorded("moved", from_state="'RUNNING'", actor=f"COALESCE($6::text, {SESSION_ACTOR})")}
SELECT * FROM moved
"""

_REQUEST_CANCEL = f"""
UPDATE jobs
SET {REQUEST_CANCEL_SET}
WHERE id = $1 AND state = 'RUNNING'
RETURNING *
"""

_CANCEL_RUNNING = f"""
WITH moved AS (
    UPDATE jobs
    SET state = 'CANCELLED', completed_at = now(), lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
      AND ($3::text IS NULL OR worker_id = $3)
    RETURNING *
), {_FROM_RUNNING}
SELECT * FROM moved
"""


@dataclass(frozen=True)
class Renewal:
    """What a lease renewal learned: jobs to cancel, and jobs this worker no longer owns."""

    cancel: set[str]
    lost: set[str]


async def renew_leases(
    conn: Conn, running: dict[str, int], lease_s: float, *, worker_id: str | None = None
) -> Renewal:
    """Extend the leases of the jobs a worker runs (id → attempt), in one statement."""
    if not running:
        return Renewal(set(), set())
    rows = await conn.fetch(
        _RENEW_LEASES, list(running), list(running.values()), lease_s, worker_id
    )
    kept = {row["id"] for row in rows}
    return Renewal(cancel={row["id"] for row in rows if row["cancel"]}, lost=set(running) - kept)


async def prepare_renewals(conn: Conn) -> None:
    """Run the renewal once with nothing to renew, so that a renewal on this
    session later costs one round trip: asyncpg asks the server about int[] the
    first time a session uses it (six round trips more)."""
    await conn.fetch(_RENEW_LEASES, [], [], 0.0, None)


@dataclass(frozen=True)
class Lost:
    """A running attempt whose worker is gone or stopped renewing its lease."""

    id: str
    type: str
    queue: str
    attempt: int
    max_attempts: int
    cancel_requested: bool


def _lost(rows: Sequence[Any]) -> list[Lost]:
    return [
        Lost(r["id"], r["type"], r["queue"], r["attempt"], r["max_attempts"], r["cancel"])
        for r in rows
    ]


async def lost_by_lease(conn: Conn, *, limit: int, grace_s: float) -> list[Lost]:
    """Running jobs whose lease ran out more than ``grace_s`` ago, locked until the
    transaction ends: run it in the transaction that calls ``take_back``."""
    return _lost(await conn.fetch(_LOST_BY_LEASE, limit, grace_s))


async def lost_by_worker(conn: Conn, worker_ids: Sequence[str], *, limit: int) -> list[Lost]:
    """Running jobs of these workers, locked as ``lost_by_lease``."""
    return _lost(await conn.fetch(_LOST_BY_WORKER, list(worker_ids), limit))


@dataclass(frozen=True)
class Rescued:
    id: str
    type: str
    queue: str
    attempt: int
    state: JobState


async def take_back(
    conn: Conn,
    decisions: Sequence[tuple[Lost, JobState, float]],
    error: str,
    *,
    actor: str | None = None,
) -> list[Rescued]:
    """Move lost attempts to RETRYING (after their delay in seconds), FAILED or
    CANCELLED, recording ``error`` as the attempt's error and ``actor`` (None: the
    session's application_name) as who moved them."""
    if not decisions:
        return []
    rows = await conn.fetch(
        _TAKE_BACK,
        [lost.id for lost, _, _ in decisions],
        [lost.attempt for lost, _, _ in decisions],
        [state.value for _, state, _ in decisions],
        [delay_s for _, _, delay_s in decisions],
        error,
        actor,
    )
    return [
        Rescued(row["id"], row["type"], row["queue"], row["attempt"], JobState(row["state"]))
        for row in rows
    ]


async def request_cancel(conn: Conn, job_id: str) -> Job | None:
    """Mark a RUNNING job for cancellation; None when it is not running."""
    row = await conn.fetchrow(_REQUEST_CANCEL, job_id)
    return None if row is None else Job.from_row(row)


async def cancel_running(
    conn: Conn, job_id: str, attempt: int, *, worker_id: str | None = None
) -> Job | None:
    """RUNNING → CANCELLED, written by the worker that stopped the attempt."""
    row = await conn.fetchrow(_CANCEL_RUNNING, job_id, attempt, worker_id)
    return None if row is None else Job.from_row(row)
