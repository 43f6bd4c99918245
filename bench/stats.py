"""Phase ``stats``: ``GET /api/v1/stats`` with ``stats_rows`` (10,000,000) jobs in the table.

The issue asks for an answer within 50 ms. A fresh database is filled in SQL
(``INSERT ... SELECT generate_series``, ``STATS_CHUNK`` rows a statement, so the
counting trigger of migration 0015 runs as it does for any bulk insert) with a
mix of states over 8 queues and 16 types: 80 % SUCCEEDED, 5 % FAILED, 5 %
CANCELLED, 6 % PENDING, 2 % RETRYING, 1 % RUNNING, 1 % WAITING. Then the
scheduler's counter folds the deltas once (``CountFolder.run_once``, as the
leading scheduler does every second) and the table is analyzed.

Only the API runs. ``stats_calls`` (200) calls, one at a time, through the real
API over HTTP, in two rounds:

- ``folded``: every delta folded, as right after a fold;
- ``unfolded``: with ``STATS_PENDING`` (10,000) delta rows not folded yet, what
  a second of a fleet writing 10,000 state-changing statements a second leaves
  between two folds (inserted as rows, not made by statements);

and, for comparison, one full count of the table by state (what the endpoint
did before migration 0015), timed in SQL.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from bench.context import Context
from bench.infra import BenchError
from bench.load import session, summary_ms

STATS_CHUNK = 500_000
STATS_PENDING = 10_000
WARMUP_CALLS = 10

# Ids are the row number, zero-padded (valid ULID characters, in insert order).
_FILL = """
INSERT INTO jobs (id, type, queue, state, attempt, run_at, created_at, started_at,
                  completed_at, waiting_for, updated_at)
SELECT '0' || lpad(g::text, 25, '0'), 't' || (g % 16), 'q' || (g / 7 % 8), s.state,
       CASE WHEN s.state IN ('PENDING', 'WAITING') THEN 0 ELSE 1 END,
       now(), now(), now(),
       CASE WHEN s.state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN now() END,
       CASE WHEN s.state = 'WAITING' THEN 1 ELSE 0 END, now()
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT CASE
         WHEN g % 100 < 80 THEN 'SUCCEEDED'
         WHEN g % 100 < 85 THEN 'FAILED'
         WHEN g % 100 < 90 THEN 'CANCELLED'
         WHEN g % 100 < 96 THEN 'PENDING'
         WHEN g % 100 < 98 THEN 'RETRYING'
         WHEN g % 100 < 99 THEN 'RUNNING'
         ELSE 'WAITING' END) AS s(state)
"""

# Deltas that net to zero (+1 and -1 for each group in turn), so the counts stay right.
_UNFOLDED = """
INSERT INTO job_count_deltas (queue, type, state, n)
SELECT 'q' || (g / 2 % 8), 't' || (g / 2 % 16), 'PENDING', CASE WHEN g % 2 = 0 THEN 1 ELSE -1 END
FROM generate_series(0, $1 - 1) AS g
"""


async def _fill(conn: asyncpg.Connection, rows: int) -> None:
    """As a bulk load does: the secondary indexes of ``jobs`` are dropped first and
    built again after (several times faster than keeping them up row by row)."""
    indexes = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes"
        " WHERE tablename = 'jobs' AND indexname <> 'jobs_pkey'"
    )
    await conn.execute("SET synchronous_commit = off")
    await conn.execute("SET maintenance_work_mem = '512MB'")
    for index in indexes:
        await conn.execute(f'DROP INDEX "{index["indexname"]}"')
    for low in range(1, rows + 1, STATS_CHUNK):
        await conn.execute(_FILL, low, min(low + STATS_CHUNK - 1, rows))
    for index in indexes:
        await conn.execute(index["indexdef"])


async def _calls(url: str, calls: int) -> tuple[list[float], dict[str, Any]]:
    latencies: list[float] = []
    body: dict[str, Any] = {}
    async with session(1) as http:
        for i in range(WARMUP_CALLS + calls):
            started = time.perf_counter()
            async with http.get(url) as response:
                body = await response.json()
                if response.status != 200:
                    raise BenchError(f"stats: GET {url} answered {response.status}: {body}")
            if i >= WARMUP_CALLS:
                latencies.append(time.perf_counter() - started)
    return latencies, body


async def run_phase(ctx: Context) -> dict[str, Any]:
    from orchestrix.services.scheduler.counter import CountFolder

    o = ctx.options
    async with ctx.database("stats") as url:
        conn = await asyncpg.connect(url)
        try:
            started = time.monotonic()
            await _fill(conn, o.stats_rows)
            fill_s = time.monotonic() - started
            pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
            try:
                started = time.monotonic()
                folded = await CountFolder(pool).run_once()
                fold_s = time.monotonic() - started
            finally:
                await pool.close()
            await conn.execute("VACUUM ANALYZE jobs, job_counts, job_count_deltas")
            print(
                f"  stats: {o.stats_rows:,} jobs filled in {fill_s:.0f} s,"
                f" {folded:,} deltas folded in {fold_s:.2f} s"
            )
            async with ctx.stack("stats", "stats", url) as stack:
                await stack.ready(stack.start("api"))
                stats_url = stack.api_url + "/api/v1/stats"
                latencies, body = await _calls(stats_url, o.stats_calls)
                await conn.execute(_UNFOLDED, STATS_PENDING)
                pending_latencies, pending_body = await _calls(stats_url, o.stats_calls)
                stack.check_alive()
            for label, took in (
                ("folded", latencies),
                (f"{STATS_PENDING:,} deltas pending", pending_latencies),
            ):
                ms = summary_ms(took)
                print(
                    f"  GET /api/v1/stats, {label}: p50 {ms['p50']:.2f} ms, p99 {ms['p99']:.2f} ms"
                )
            if body["total"] != o.stats_rows or pending_body != body:
                raise BenchError(f"stats: the counts are wrong: {body} / {pending_body}")
            started = time.monotonic()
            await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
            full_count_s = time.monotonic() - started
            size = await conn.fetchval("SELECT pg_total_relation_size('jobs')")
        finally:
            await conn.close()
    result = {
        "rows": o.stats_rows,
        "calls": o.stats_calls,
        "fill_s": round(fill_s, 1),
        "deltas_folded": folded,
        "fold_s": round(fold_s, 2),
        "jobs_bytes": size,
        "folded_ms": summary_ms(latencies),
        "unfolded_deltas": STATS_PENDING,
        "unfolded_ms": summary_ms(pending_latencies),
        "full_count_s": round(full_count_s, 2),
        "counts": body["jobs"],
    }
    print(f"  the full count it replaces: {full_count_s:.2f} s")
    return result
