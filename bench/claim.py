"""Phase 5, claim cost: a table holding many finished jobs against an empty one.

Two fresh databases, each with the same N pending noop jobs. The "full" one
then gets ``finished_rows`` (1,000,000) SUCCEEDED rows from ``INSERT ... SELECT
generate_series`` (ids of the ULID form the schema checks, type
``bench_filler``, every timestamp a terminal row needs), in steps (20k, 50k,
200k, then all), each followed by ``VACUUM ANALYZE``. In each database, and at
each step of the full one:

- the claim itself is timed: ``claim`` (a worker's claim, of CLAIM_BATCH jobs,
  as the old scheduler claimed 500) 10 times, each in a transaction that is rolled back
  (so each claims the same jobs), plus ``EXPLAIN (ANALYZE, BUFFERS)`` of the
  claim statement; the minimum is compared, being the least disturbed. The
  plan's join method is kept: a ``Hash Join`` means the UPDATE scanned the
  whole table to find the claimed rows, so its cost grows with finished jobs.

Then, in each database:

- the jobs are drained by 1 scheduler + 1 worker, as in phase 1.

The drains alternate between the two tables for ``claim_rounds`` (2) rounds,
so that a disturbance from elsewhere on the machine hits both alike, and the
best round of each counts (interference only ever slows a run down). The empty
table is emptied again before each round; the full one keeps its rows.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import asyncpg
from orchestrix.db import jobs as db

from bench.context import Context
from bench.drain import drain
from bench.infra import checkpoint, empty_jobs, insert_noop_jobs

FILL_CHUNK = 200_000
CLAIM_BATCH = 500
# Table sizes (finished rows) at which the claim is also timed on the way to the full one.
CURVE = (20_000, 50_000, 200_000)

_FILL = """
INSERT INTO jobs (id, type, state, attempt, run_at, created_at, scheduled_at,
                  started_at, completed_at, updated_at)
SELECT '0' || lpad(g::text, 25, '0'), 'bench_filler', 'SUCCEEDED', 1,
       t, t, t, t, t, t
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - make_interval(secs => ($2 - g) / 1000.0)) AS ts(t)
"""


class _Rollback(Exception):
    pass


async def fill_finished(url: str, first: int, last: int) -> None:
    """Insert the SUCCEEDED filler jobs numbered ``first`` to ``last``."""
    conn = await asyncpg.connect(url)
    try:
        for low in range(first, last + 1, FILL_CHUNK):
            await conn.execute(_FILL, low, min(low + FILL_CHUNK - 1, last))
    finally:
        await conn.close()


async def vacuum(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE jobs")
    finally:
        await conn.close()
    await checkpoint(url)


def join_method(plan: list[str]) -> str | None:
    """How the claim's UPDATE finds the claimed rows: ``Nested Loop`` (by primary key)
    or a ``Hash Join`` / ``Merge Join`` over a scan of the whole table."""
    for line in plan:
        node = line.strip().removeprefix("->").strip()
        for method in ("Nested Loop", "Hash Join", "Merge Join"):
            if node.startswith(method):
                return method
    return None


async def time_claims(url: str, batch: int, rounds: int = 10) -> dict[str, Any]:
    """Time ``claim_due`` on ``url``, each time in a transaction that is rolled back.

    Every round therefore claims the same ``batch`` jobs from the same table; the
    minimum is the least disturbed figure, the median the typical one. One more
    rolled-back round runs ``EXPLAIN (ANALYZE, BUFFERS)`` of the claim statement.
    """
    conn = await asyncpg.connect(
        # As the scheduler connects, with its session settings if the engine has any.
        url,
        server_settings=db.CLAIM_SERVER_SETTINGS,
    )
    times: list[float] = []
    plan: list[str] = []
    claimed = 0
    try:
        for _ in range(rounds):
            try:
                async with conn.transaction():
                    started = time.perf_counter()
                    claimed = len(
                        await db.claim(
                            conn,
                            worker_id="bench",
                            queues=None,
                            types=["noop"],
                            limit=batch,
                            lease_s=30,
                        )
                    )
                    times.append(time.perf_counter() - started)
                    raise _Rollback
            except _Rollback:
                pass
        # The statement itself, when the module still names it so.
        sql = getattr(db, "_CLAIM", None)
        if isinstance(sql, str):
            try:
                async with conn.transaction():
                    rows = await conn.fetch(
                        "EXPLAIN (ANALYZE, BUFFERS) " + sql, None, ["noop"], batch, "bench", 30.0
                    )
                    plan = [row[0] for row in rows]
                    raise _Rollback
            except _Rollback:
                pass
    finally:
        await conn.close()
    return {
        "batch": batch,
        "rounds": rounds,
        "claimed": claimed,
        "ms_median": round(statistics.median(times) * 1000, 3),
        "ms_min": round(min(times) * 1000, 3),
        "ms_max": round(max(times) * 1000, 3),
        "per_job_us": round(min(times) / max(1, claimed) * 1e6, 2),
        "explain": plan,
    }


async def _add_pending(url: str, jobs: int, *, truncate: bool) -> None:
    conn = await asyncpg.connect(url)
    try:
        if truncate:
            await empty_jobs(conn)
        await insert_noop_jobs(conn, jobs)
    finally:
        await conn.close()
    await vacuum(url)


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    batch = CLAIM_BATCH
    result: dict[str, Any] = {
        "finished_rows": o.finished_rows,
        "jobs": o.jobs,
        "rounds": o.claim_rounds,
    }
    async with ctx.database("claim_empty") as empty_url, ctx.database("claim_full") as full_url:
        urls = {"empty": empty_url, "full": full_url}
        claims: dict[str, dict[str, Any]] = {}
        await _add_pending(empty_url, o.jobs, truncate=True)
        claims["empty"] = await time_claims(empty_url, batch)
        curve = [_point(0, claims["empty"])]
        # The full table gets its pending jobs first, then the finished ones in
        # steps, the claim timed at each: its cost along the way, not just at the end.
        await _add_pending(full_url, o.jobs, truncate=False)
        started, done = time.monotonic(), 0
        for level in sorted({n for n in CURVE if n < o.finished_rows} | {o.finished_rows}):
            await fill_finished(full_url, done + 1, level)
            done = level
            await vacuum(full_url)
            claims["full"] = await time_claims(full_url, batch)
            curve.append(_point(level, claims["full"]))
        # The rolled-back claims left dead row versions behind: clear them, so
        # that the drains below find the tables as the claims found them.
        await vacuum(empty_url)
        await vacuum(full_url)
        fill_s = round(time.monotonic() - started, 1)
        print(
            f"  claim of {batch} by finished rows: "
            + ", ".join(
                f"{p['finished_rows']:,}: {p['ms_min']:.1f} ms ({p['join']})" for p in curve
            )
            + f" (filled in {fill_s:.0f} s)",
            flush=True,
        )
        runs: dict[str, list[dict[str, Any]]] = {"empty": [], "full": []}
        # Alternate the two tables, so that a disturbance hits both alike; the
        # empty one is emptied again before each round.
        for round_ in range(o.claim_rounds):
            for label, url in urls.items():
                if round_ > 0:
                    await _add_pending(url, o.jobs, truncate=label == "empty")
                run = await drain(
                    ctx,
                    "claim",
                    f"claim-{label}-{round_ + 1}",
                    url,
                    workers=1,
                    jobs=o.jobs,
                    insert=False,
                )
                runs[label].append(run.to_json())
                waits = ", ".join(f"{k} {v:.0%}" for k, v in list(run.pg_waits.items())[:3])
                print(
                    f"  claim, {label} table (round {round_ + 1}): drain 1 worker "
                    f"{run.jobs_per_s:,.0f} jobs/s (PostgreSQL: {waits})",
                    flush=True,
                )
    for label, rows in (("empty", 0), ("full", o.finished_rows)):
        best = max(runs[label], key=lambda r: float(r["jobs_per_s"]))
        result[label] = {
            "finished_rows": rows,
            "claim": claims[label],
            "drain": best,
            "drain_jobs_per_s_each_round": [r["jobs_per_s"] for r in runs[label]],
        }
    result["fill_s"] = fill_s
    result["claim_curve"] = curve
    empty, full = result["empty"], result["full"]
    result["drain_ratio"] = (
        round(full["drain"]["jobs_per_s"] / empty["drain"]["jobs_per_s"], 3)
        if empty["drain"]["jobs_per_s"]
        else None
    )
    result["claim_ratio"] = round(full["claim"]["ms_min"] / empty["claim"]["ms_min"], 3)
    return result


def _point(rows: int, claim: dict[str, Any]) -> dict[str, Any]:
    return {
        "finished_rows": rows,
        "ms_min": claim["ms_min"],
        "ms_median": claim["ms_median"],
        "join": join_method(claim["explain"]),
    }
