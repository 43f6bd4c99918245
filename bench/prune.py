"""Phase ``prune``: what pruning a million finished jobs costs a drain running beside it.

Two fresh databases, each filled with ``prune_rows`` (1,000,000) SUCCEEDED
``bench_filler`` jobs that finished two days ago (``VACUUM ANALYZE`` after),
and each drained of ``prune_jobs`` (100,000) no-op jobs by 1 scheduler and
``prune_workers`` (2) workers:

- ``off``: the scheduler runs with ``RETENTION_SUCCEEDED=0``, so it prunes nothing;
- ``on``: with ``RETENTION_SUCCEEDED=1d``, so every filler job is due. The jobs
  to drain go in only once the scheduler's ``orchestrix_jobs_pruned_total``
  shows that pruning has begun, so the drain runs while it prunes (the drained
  jobs themselves finish now: a day short of being pruned).

The drain rate is taken from the jobs' own timestamps, as in the drain phase:
no-op jobs SUCCEEDED / (max(completed_at) - min(started_at)). Beside it: the
jobs pruned while the drain ran, and the pruning rate over the whole prune
(from the first pruned job seen to the last, read from the scheduler's metric
every 0.1 s). ``prune_rounds`` (2; 1 in --quick) rounds go through off and on in
turn, in the order off, on, on, off, ...; each one's best round counts.

What else ran beside each drain is kept with it, to tell the pruner's cost from
the rest: ``pg_stat_activity`` every 50 ms (the share of samples in which an
autovacuum of the database was at work, and in which the pruner's DELETE was)
and the CPU each process group used (``cpu_s``, as in the drain phase).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import aiohttp
import asyncpg

from bench.claim import vacuum
from bench.context import Context
from bench.infra import (
    BenchError,
    CpuMeter,
    Service,
    Stack,
    insert_noop_jobs,
    sampling,
    unfinished,
)

FILL_CHUNK = 200_000
POLL_S = 0.1
# Finished two days ago: past a retention of one day, unlike the drained jobs.
_FILL = """
INSERT INTO jobs (id, type, state, attempt, run_at, created_at, scheduled_at,
                  started_at, completed_at, updated_at)
SELECT '0' || lpad(g::text, 25, '0'), 'bench_filler', 'SUCCEEDED', 1,
       t, t, t, t, t, t
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - interval '2 days' - make_interval(secs => ($2 - g) / 1000.0))
     AS ts(t)
"""
# Who beside the drain is at work on the database: an autovacuum worker (its
# query names the table) or the pruner's DELETE (db.retention).
_BESIDE = """
SELECT CASE WHEN backend_type = 'autovacuum worker' THEN query ELSE 'prune' END
FROM pg_stat_activity
WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
  AND (backend_type = 'autovacuum worker' OR query LIKE '%DELETE FROM jobs WHERE id = ANY%')
"""
SAMPLE_S = 0.05
_PRUNED = re.compile(r'^orchestrix_jobs_pruned_total\{state="SUCCEEDED"\} ([0-9.e+]+)$', re.M)


async def fill_old(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        for low in range(1, rows + 1, FILL_CHUNK):
            await conn.execute(_FILL, low, min(low + FILL_CHUNK - 1, rows))
    finally:
        await conn.close()


async def pruned_so_far(http: aiohttp.ClientSession, scheduler: Service) -> int:
    """The scheduler's ``orchestrix_jobs_pruned_total{state="SUCCEEDED"}``."""
    async with http.get(f"http://127.0.0.1:{scheduler.port}/metrics") as response:
        match = _PRUNED.search(await response.text())
    if match is None:
        raise BenchError("the scheduler exports no orchestrix_jobs_pruned_total")
    return int(float(match.group(1)))


async def _until_pruned(
    http: aiohttp.ClientSession, stack: Stack, scheduler: Service, at_least: int, timeout_s: float
) -> tuple[int, float]:
    """Poll the metric until it reaches ``at_least``; (its value, when, monotonic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stack.check_alive()
        count = await pruned_so_far(http, scheduler)
        if count >= at_least:
            return count, time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"{stack.label}: {count} jobs pruned after {timeout_s:g}s")
        await asyncio.sleep(POLL_S)


async def _run(ctx: Context, label: str, round_: int) -> dict[str, Any]:
    o = ctx.options
    pruning = label == "on"
    async with ctx.database(f"prune_{label}") as url:
        started = time.monotonic()
        await fill_old(url, o.prune_rows)
        await vacuum(url)
        fill_s = time.monotonic() - started
        conn = await asyncpg.connect(url)
        try:
            async with (
                ctx.stack("prune", f"prune-{label}-{round_}", url) as stack,
                aiohttp.ClientSession() as http,
            ):
                stack.env["RETENTION_SUCCEEDED"] = "1d" if pruning else "0"
                scheduler = stack.start("scheduler")
                workers = [stack.start("worker") for _ in range(o.prune_workers)]
                await stack.ready(scheduler, *workers)
                first_seen = (0, 0.0)
                if pruning:
                    first_seen = await _until_pruned(http, stack, scheduler, 1, 60.0)
                before = await pruned_so_far(http, scheduler)
                async with conn.transaction():
                    await insert_noop_jobs(conn, o.prune_jobs)
                    await conn.execute("ANALYZE jobs")
                launched = time.monotonic()
                deadline = launched + 60.0 + o.prune_jobs / 50.0
                meter = CpuMeter(stack.roles(), ctx.servers.pids)
                async with sampling(url, _BESIDE, SAMPLE_S) as samples:
                    while await unfinished(conn):
                        stack.check_alive()
                        if time.monotonic() > deadline:
                            raise BenchError(f"{stack.label}: the drain did not finish")
                        await asyncio.sleep(POLL_S)
                # Each kind of work counted once in each sample it was seen in.
                seen = Counter(what for sample in samples for what in set(sample))
                wall_s = time.monotonic() - launched
                cpu_s = meter.stop()
                during = await pruned_so_far(http, scheduler) - before
                result: dict[str, Any] = {"fill_s": round(fill_s, 1)}
                if pruning:
                    count, done_at = await _until_pruned(
                        http, stack, scheduler, o.prune_rows, 60.0 + o.prune_rows / 500.0
                    )
                    span = done_at - first_seen[1]
                    result["pruned"] = count
                    result["prune_s"] = round(span, 2)
                    result["pruned_rows_per_s"] = (
                        round((count - first_seen[0]) / span, 1) if span > 0 else None
                    )
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'SUCCEEDED') AS ok,"
                " extract(epoch FROM max(completed_at) - min(started_at)) AS span"
                " FROM jobs WHERE type = 'noop'"
            )
            left = await conn.fetchval("SELECT count(*) FROM jobs WHERE type = 'bench_filler'")
        finally:
            await conn.close()
    span_s = float(row["span"] or 0.0)
    result.update(
        {
            "label": label,
            "jobs": o.prune_jobs,
            "succeeded": row["ok"],
            "jobs_per_s": round(row["ok"] / span_s, 1) if span_s > 0 else 0.0,
            "wall_s": round(wall_s, 2),
            "pruned_during_drain": during,
            "pruned_during_drain_per_s": round(during / wall_s, 1) if wall_s > 0 else None,
            "filler_left": left,
            "cpu_s": cpu_s,
            "beside": {what: round(n / max(len(samples), 1), 3) for what, n in seen.most_common()},
        }
    )
    return result


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for round_ in range(1, o.prune_rounds + 1):
        # off, on, then on, off, ...: what comes first or second in a round (the
        # other database just dropped, say) weighs on both alike.
        for label in ("off", "on") if round_ % 2 else ("on", "off"):
            run = await _run(ctx, label, round_)
            runs[label].append(run)
            extra = (
                f"; {run['pruned_during_drain']:,} pruned during the drain "
                f"({run['pruned_during_drain_per_s']:,.0f}/s), all {run['pruned']:,} in "
                f"{run['prune_s']:.1f} s ({run['pruned_rows_per_s']:,.0f} rows/s)"
                if label == "on"
                else ""
            )
            beside = ", ".join(f"{what} {share:.0%}" for what, share in run["beside"].items())
            cores = run["cpu_s"]
            extra += (
                f"; beside the drain: {beside or 'nothing'}; cores busy: postgres "
                f"{cores.get('postgres', 0) / cores['wall']:.2f}, workers "
                f"{cores.get('worker', 0) / cores['wall']:.2f}, scheduler "
                f"{cores.get('scheduler', 0) / cores['wall']:.2f}"
            )
            print(
                f"  prune {label}, round {round_}: drain {o.prune_jobs:,} jobs with "
                f"{o.prune_workers} workers beside {o.prune_rows:,} old finished jobs: "
                f"{run['jobs_per_s']:,.0f} jobs/s (wall {run['wall_s']:.1f} s){extra}",
                flush=True,
            )
    best = {label: max(done, key=lambda r: float(r["jobs_per_s"])) for label, done in runs.items()}
    off, on = best["off"]["jobs_per_s"], best["on"]["jobs_per_s"]
    return {
        "rows": o.prune_rows,
        "jobs": o.prune_jobs,
        "workers": o.prune_workers,
        "rounds": o.prune_rounds,
        "off": best["off"],
        "on": best["on"],
        "each_round": runs,
        "drain_ratio": round(on / off, 3) if off else None,
    }
