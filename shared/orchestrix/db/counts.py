"""Every query on ``job_counts`` and ``job_count_deltas``: job counts that are cheap to read.

Migration 0015 says how the counts are kept: a trigger appends a delta row for
each (queue, type, state) a statement changed; :func:`fold` (the scheduler's
counter) moves the deltas into ``job_counts``. :func:`read` adds the two in one
statement, so its counts are exact for its snapshot however far behind the fold
is; the fold only keeps the delta rows, and with them the read's cost, small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrix.states import CLAIMABLE, JobState

Conn = Any

# Two folds at once (two schedulers that both believe they lead) would lock the
# same counts in different orders; the second one steps aside instead. An
# arbitrary constant, as leader.MAINTENANCE_LOCK.
FOLD_LOCK = 0x4F52_4358_434E_5453  # "ORCXCNTS"

# Up to $1 delta rows deleted and added to the counts, in one statement. The
# transaction sees only committed deltas; one committed later stays for the next
# fold. The fold's transaction holds FOLD_LOCK.
_FOLD = """
WITH folded AS (
    DELETE FROM job_count_deltas
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM job_count_deltas LIMIT $1))
    RETURNING queue, type, state, n
), sums AS (
    SELECT queue, type, state, sum(n)::bigint AS n FROM folded
    GROUP BY queue, type, state HAVING sum(n) <> 0
), added AS (
    INSERT INTO job_counts AS c (queue, type, state, n)
    SELECT queue, type, state, n FROM sums
    ON CONFLICT (queue, type, state) DO UPDATE SET n = c.n + excluded.n
    RETURNING n
)
SELECT (SELECT count(*) FROM folded) AS deltas,
       (SELECT count(*) FROM added WHERE n = 0) AS emptied
"""

# A (queue, type) with no job left in a state keeps no row.
_DROP_EMPTY = "DELETE FROM job_counts WHERE n = 0"

# The counts now: folded plus not yet folded, in one snapshot. By state over
# everything, and by (queue, type) over the jobs that wait to be claimed.
_READ = f"""
WITH c AS MATERIALIZED (
    SELECT queue, type, state, n FROM job_counts
    UNION ALL
    SELECT queue, type, state, n FROM job_count_deltas
)
SELECT NULL AS queue, NULL AS type, state, sum(n)::bigint AS n FROM c GROUP BY state
UNION ALL
SELECT queue, type, NULL, sum(n)::bigint FROM c
WHERE state IN ({", ".join(f"'{state.value}'" for state in sorted(CLAIMABLE))})
GROUP BY queue, type HAVING sum(n) > 0
"""

# By queue and state, for every queue or only $1 (NULL: every one).
_BY_QUEUE = """
SELECT queue, state, sum(n)::bigint AS n FROM (
    SELECT queue, state, n FROM job_counts WHERE $1::text IS NULL OR queue = $1
    UNION ALL
    SELECT queue, state, n FROM job_count_deltas WHERE $1::text IS NULL OR queue = $1
) AS c
GROUP BY queue, state HAVING sum(n) <> 0
"""

_PENDING = "SELECT count(*) FROM job_count_deltas"


@dataclass(frozen=True)
class Counts:
    by_state: dict[JobState, int]
    # (queue, type, how many) for each pair with jobs PENDING or RETRYING.
    waiting: list[tuple[str, str, int]]


async def read(conn: Conn) -> Counts:
    """The jobs by state (every state named), and those waiting by (queue, type)."""
    by_state = dict.fromkeys(JobState, 0)
    waiting: list[tuple[str, str, int]] = []
    for row in await conn.fetch(_READ):
        if row["state"] is not None:
            by_state[JobState(row["state"])] = row["n"]
        else:
            waiting.append((row["queue"], row["type"], row["n"]))
    return Counts(by_state, waiting)


async def by_queue(conn: Conn, name: str | None = None) -> dict[str, dict[JobState, int]]:
    """The jobs of every queue with jobs (or of ``name`` only) by state, every state named."""
    counts: dict[str, dict[JobState, int]] = {}
    for row in await conn.fetch(_BY_QUEUE, name):
        by_state = counts.setdefault(row["queue"], dict.fromkeys(JobState, 0))
        by_state[JobState(row["state"])] = row["n"]
    return counts


async def fold(conn: Conn, limit: int) -> int | None:
    """Fold up to ``limit`` deltas into the counts, in a transaction of its own;
    how many, or None when another fold holds the lock. ``conn`` is a connection,
    not a pool."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", FOLD_LOCK):
            return None
        row = await conn.fetchrow(_FOLD, limit)
        if row["emptied"]:
            await conn.execute(_DROP_EMPTY)
        deltas: int = row["deltas"]
        return deltas


async def pending(conn: Conn) -> int:
    """How many delta rows wait to be folded."""
    n: int = await conn.fetchval(_PENDING)
    return n
