"""Phase ``retention``: a steady stream of jobs with a short retention; the table stops growing.

1 scheduler (``RETENTION_SUCCEEDED`` = ``retention_window_s``, 30 s) and 2
workers; the benchmark inserts ``retention_rate`` (1,000) no-op jobs a second
for ``retention_duration_s`` (5 minutes), a tenth of a second's worth every
0.1 s straight into PostgreSQL (an open loop: a late tick catches up; the API
is measured elsewhere and would cost this 2-core machine's CPU, not the
table's size). Every ``retention_sample_s`` (10 s) it prints and keeps:

- the table's heap size, its indexes' size and the total (with TOAST);
- the jobs in it (``count(*)``), and dead tuples and autovacuum runs from
  ``pg_stat_user_tables`` (these statistics lag by up to a second or so);
- the jobs pruned so far (the scheduler's ``orchestrix_jobs_pruned_total``);
- bytes per job in the table: total size / jobs in it.

Once the first window has passed, the pruner deletes as many jobs a second as
arrive, and (auto)vacuum makes their space free for the new ones: the table
should stop growing. The result names the total size at two windows into the
run and at its end, and the growth between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import asyncpg
from orchestrix import ids

from bench.context import Context
from bench.infra import Stack
from bench.prune import pruned_so_far

TICK_S = 0.1
_SIZES = """
SELECT pg_relation_size('jobs') AS heap, pg_indexes_size('jobs') AS indexes,
       pg_total_relation_size('jobs') AS total,
       (SELECT count(*) FROM jobs) AS jobs,
       (SELECT count(*) FROM jobs WHERE state IN ('PENDING', 'RUNNING', 'RETRYING')) AS waiting,
       s.n_dead_tup AS dead, s.autovacuum_count AS autovacuums
FROM pg_stat_user_tables AS s WHERE s.relname = 'jobs'
"""


# Every index of jobs, and the history table, by size: what a job costs, and where.
_RELATIONS = """
SELECT indexrelid::regclass::text AS name, pg_relation_size(indexrelid) AS bytes
FROM pg_index WHERE indrelid = 'jobs'::regclass
UNION ALL SELECT 'job_events (with its indexes)', pg_total_relation_size('job_events')
ORDER BY bytes DESC
"""


async def _insert_steadily(url: str, rate: float, duration_s: float) -> int:
    """Insert ``rate`` no-op jobs a second for ``duration_s``; how many went in."""
    conn = await asyncpg.connect(url)
    inserted = 0
    began = time.monotonic()
    try:
        tick = 0
        while True:
            due_at = began + tick * TICK_S
            if due_at >= began + duration_s:
                return inserted
            await asyncio.sleep(max(0.0, due_at - time.monotonic()))
            tick += 1
            # Open loop: as many as are due by now, whether or not the last tick was late.
            count = int(rate * min(duration_s, time.monotonic() - began + TICK_S)) - inserted
            if count <= 0:
                continue
            await conn.execute(
                "INSERT INTO jobs (id, type) SELECT * FROM unnest($1::text[], $2::text[])",
                [ids.new_id() for _ in range(count)],
                ["noop"] * count,
            )
            inserted += count
    finally:
        await conn.close()


async def _sample(
    conn: Any, http: aiohttp.ClientSession, stack: Stack, began: float
) -> dict[str, Any]:
    stack.check_alive()
    row = await conn.fetchrow(_SIZES)
    scheduler = next(s for s in stack.services if s.role == "scheduler")
    point = {
        "t_s": round(time.monotonic() - began, 1),
        "heap_bytes": row["heap"],
        "index_bytes": row["indexes"],
        "total_bytes": row["total"],
        "jobs": row["jobs"],
        "unfinished": row["waiting"],
        "dead_tuples": row["dead"],
        "autovacuums": row["autovacuums"],
        "pruned": await pruned_so_far(http, scheduler),
    }
    point["bytes_per_job"] = round(row["total"] / row["jobs"]) if row["jobs"] else None
    print(
        f"  t={point['t_s']:>5.0f}s  jobs {row['jobs']:>8,}  heap {row['heap'] / 2**20:7.1f} MiB"
        f"  indexes {row['indexes'] / 2**20:7.1f} MiB  total {row['total'] / 2**20:7.1f} MiB"
        f"  dead {row['dead']:>8,}  bytes/job {point['bytes_per_job'] or 0:>6,}"
        f"  pruned {point['pruned']:>9,}  autovacuums {row['autovacuums']}",
        flush=True,
    )
    return point


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    window = o.retention_window_s
    samples: list[dict[str, Any]] = []
    async with (
        ctx.database("retention") as url,
        ctx.stack("retention", "retention", url) as stack,
        aiohttp.ClientSession() as http,
    ):
        stack.env["RETENTION_SUCCEEDED"] = f"{window:g}s"
        services = [stack.start("scheduler")] + [stack.start("worker") for _ in range(2)]
        await stack.ready(*services)
        conn = await asyncpg.connect(url)
        try:
            began = time.monotonic()
            inserter = asyncio.create_task(
                _insert_steadily(url, o.retention_rate, o.retention_duration_s)
            )
            try:
                samples.append(await _sample(conn, http, stack, began))
                while not inserter.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(inserter), o.retention_sample_s)
                    samples.append(await _sample(conn, http, stack, began))
                inserted = await inserter
            finally:
                inserter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await inserter
            relations = {row["name"]: row["bytes"] for row in await conn.fetch(_RELATIONS)}
        finally:
            await conn.close()
    elapsed = samples[-1]["t_s"]
    # The size two windows in: the first window's jobs are being pruned by then,
    # and the table has had a window's time to reuse their space.
    settled = next((p for p in samples if p["t_s"] >= 2 * window), None)
    end = samples[-1]
    growth = (
        round(end["total_bytes"] / settled["total_bytes"] - 1, 3)
        if settled is not None and settled is not end
        else None
    )
    print(
        "  at the end, by relation: "
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in relations.items()),
        flush=True,
    )
    return {
        "rate": o.retention_rate,
        "duration_s": o.retention_duration_s,
        "retention_s": window,
        "inserted": inserted,
        "inserted_per_s": round(inserted / elapsed, 1) if elapsed else None,
        "samples": samples,
        "total_bytes_at_two_windows": settled["total_bytes"] if settled else None,
        "total_bytes_at_end": end["total_bytes"],
        "max_total_bytes": max(p["total_bytes"] for p in samples),
        "growth_after_two_windows": growth,
        "bytes_per_job_at_end": end["bytes_per_job"],
        "dead_tuples_at_end": end["dead_tuples"],
        "index_growth_after_two_windows": (
            round(end["index_bytes"] / settled["index_bytes"] - 1, 3)
            if settled is not None and settled is not end and settled["index_bytes"]
            else None
        ),
        "relation_bytes_at_end": relations,
    }
