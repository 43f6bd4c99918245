"""Every filter combination of GET /api/v1/jobs walks its index, newest first.

On 100,000 jobs (20 queues, 200 types each sent to one queue but for a quiet
queue ``rare``, the states a busy system has), the plan of each combination, with
and without a cursor, for values that match few jobs and values that match most,
and as a custom and as a generic plan (asyncpg prepares its statements: after
five runs PostgreSQL may keep a generic one), must be one backward scan of the
combination's index under the LIMIT: no sort, no sequential or bitmap scan, no
walk of the primary key checking filters. Where the index holds every filter
(all but type+queue and state+type+queue), the scan reads only the rows it
returns, or (the planner's choice when most jobs match the other filter) walks
the index of the type or queue and checks the state on each of its rows. The two
without an index of their own walk the type's index checking the queue, or, for
a queue of few jobs, read that queue's jobs through its index and sort only
those: never a sort of the table, never a sequential scan.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from orchestrix.db import jobs as db
from orchestrix.states import JobState

JOBS = 100_000
LIMIT = 50
COMBINATIONS = [
    frozenset(combo)
    for size in range(4)
    for combo in itertools.combinations(("state", "type", "queue"), size)
]

# The index that holds each combination's filters as leading columns.
EXACT: dict[frozenset[str], str] = {
    frozenset(): "jobs_pkey",
    frozenset({"state"}): "jobs_state_id_idx",
    frozenset({"type"}): "jobs_type_id_idx",
    frozenset({"queue"}): "jobs_queue_id_idx",
}
# The filter db.list_query walks (with id); the others are equalities.
WALKED = {
    frozenset({"state", "type"}): "type",
    frozenset({"state", "queue"}): "queue",
    frozenset({"type", "queue"}): "type",
    frozenset({"state", "type", "queue"}): "type",
}
# Every index of the row costs each insert and state change an entry: the state
# with type or queue walks the type's or queue's index, checking the state.
NO_INDEX_OF_ITS_OWN = {
    frozenset({"type", "queue"}),
    frozenset({"state", "type", "queue"}),
    frozenset({"state", "type"}),
    frozenset({"state", "queue"}),
}
# The indexes the planner may walk: the exact one, or the walked filter's own
# (checking the rest); never the primary key, unless there is no filter.
INDEX: dict[frozenset[str], set[str]] = {
    combo: {EXACT[combo]} if combo in EXACT else set() for combo in COMBINATIONS
}
for _combo, _walked in WALKED.items():
    INDEX[_combo] |= {f"jobs_{_walked}_id_idx"}
# Values that select a few jobs, and values that select most of them.
SELECTIVE = {"state": "FAILED", "type": "t7", "queue": "rare"}
COMMON = {"state": "SUCCEEDED", "type": "t8", "queue": "q8"}

# States from a hash of i, so that they do not follow the types and queues.
_FILL = """
INSERT INTO jobs (id, type, queue, state, attempt, completed_at, created_at, run_at)
SELECT '01' || lpad(i::text, 24, '0'),
       't' || (i % 200),
       CASE WHEN i % 1000 = 7 THEN 'rare' ELSE 'q' || (i % 200 % 20) END,
       s.state,
       CASE WHEN s.state = 'PENDING' THEN 0 ELSE 1 END,
       CASE WHEN s.state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN now() END,
       now(), now()
FROM generate_series(1, $1) AS i
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN i * 7919 % 100 < 80 THEN 'SUCCEEDED'
        WHEN i * 7919 % 100 < 88 THEN 'PENDING'
        WHEN i * 7919 % 100 < 91 THEN 'RUNNING'
        WHEN i * 7919 % 100 < 93 THEN 'FAILED'
        WHEN i * 7919 % 100 < 96 THEN 'CANCELLED'
        ELSE 'RETRYING'
    END AS state
) AS s
"""


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", ()):
        found.extend(nodes(child))
    return found


@pytest.fixture(scope="module")
async def filled(session_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """One table for every case of this module (the ``pool`` fixture empties it
    before any other test that uses it)."""
    await session_pool.execute(
        "TRUNCATE jobs, job_events, job_dependencies, workflows, job_counts, job_count_deltas"
    )
    await session_pool.execute(_FILL, JOBS)
    await session_pool.execute("ANALYZE jobs")
    yield session_pool
    await session_pool.execute(
        "TRUNCATE jobs, job_events, job_dependencies, workflows, job_counts, job_count_deltas"
    )


async def explain(
    conn: asyncpg.Connection, sql: str, args: list[Any], plan_mode: str
) -> dict[str, Any]:
    """The plan the query runs with, run (ANALYZE) as a named prepared statement,
    so that ``plan_mode`` decides whether it is the custom or the generic one."""
    literals = ", ".join(f"'{arg}'" if isinstance(arg, str) else str(arg) for arg in args)
    await conn.execute(f"SET plan_cache_mode = {plan_mode}")
    await conn.execute(f"PREPARE listed AS {sql}")
    try:
        (top,) = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE listed({literals})")
    finally:
        await conn.execute("DEALLOCATE listed")
        await conn.execute("RESET plan_cache_mode")
    plan: dict[str, Any] = top["Plan"]
    return plan


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("values", [SELECTIVE, COMMON], ids=["selective", "common"])
@pytest.mark.parametrize("cursor", [None, "01" + str(JOBS // 2).rjust(24, "0")])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(sorted(c)) or "none")
async def test_every_filter_reads_through_an_index_newest_first(
    filled: asyncpg.Pool,
    combo: frozenset[str],
    cursor: str | None,
    values: dict[str, str],
    plan_mode: str,
) -> None:
    chosen = {name: value for name, value in values.items() if name in combo}
    where = db.JobFilter(
        state=JobState(chosen["state"]) if "state" in chosen else None,
        type=chosen.get("type"),
        queue=chosen.get("queue"),
    )
    sql, args = db.list_query(where, limit=LIMIT + 1, before=cursor, include=())
    async with filled.acquire() as conn:
        plan = await explain(conn, sql, args, plan_mode)
        every, every_args = db.list_query(where, limit=JOBS, before=cursor, include=())
        matches = await conn.fetchval(f"SELECT count(*) FROM ({every}) AS m", *every_args)
    below = nodes(plan)[1:]
    kinds = [node["Node Type"] for node in below]
    assert plan["Node Type"] == "Limit", plan
    if combo in NO_INDEX_OF_ITS_OWN and kinds[0] == "Sort":
        # Few jobs in the queue: the planner reads them all through its index (an
        # index or bitmap scan) and sorts those, which it may: only the matches
        # are sorted, never the table.
        # With the state too, it may AND two indexes (the state's and the other's).
        assert kinds[1:] in (
            ["Index Scan"],
            ["Bitmap Heap Scan", "Bitmap Index Scan"],
            ["Bitmap Heap Scan", "BitmapAnd", "Bitmap Index Scan", "Bitmap Index Scan"],
        ), kinds
        read = {node["Index Name"] for node in below if "Index Name" in node}
        # (jobs_finished_idx is the pruner's (state, completed_at), for finished states.)
        assert read <= {
            "jobs_queue_id_idx",
            "jobs_type_id_idx",
            "jobs_state_id_idx",
            "jobs_finished_idx",
        }, read
        assert below[1]["Actual Rows"] == matches
        assert matches <= 2 * LIMIT
        return
    assert kinds in (["Index Scan"], ["Index Only Scan"]), kinds
    (scan,) = below
    assert scan["Scan Direction"] == "Backward", scan
    assert scan["Actual Rows"] == min(LIMIT + 1, matches)
    assert scan["Index Name"] in INDEX[combo], (combo, scan["Index Name"])
    if scan["Index Name"] == EXACT.get(combo):
        assert "Filter" not in scan, scan  # it reads only what it returns
        return
    # The index of the walked filter, checking the others on each of its rows: it
    # passes over no more than that filter's rows (and never walks the primary key).
    walked = WALKED[combo]
    of_walked = await filled.fetchval(
        f"SELECT count(*) FROM jobs WHERE {walked} = $1", chosen[walked]
    )
    assert scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0) <= of_walked
