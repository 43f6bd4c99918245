"""Phase 3, latency at light load: jobs created over the API at a low fixed rate.

API + 1 scheduler + 1 worker; ``latency_rate`` jobs/s (100) for
``latency_duration_s`` (10 s), open loop. The figures come from each job's own
timestamps, all written by PostgreSQL's clock: create→start is
``started_at - created_at``, create→finish is ``completed_at - created_at``;
create→claim (``scheduled_at - created_at``) shows how create→start divides
between the scheduler's part and the hop through NATS to the worker's start.
A short warm-up (not counted) opens the HTTP connections first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from bench.context import Context
from bench.infra import BenchError, CpuMeter, unfinished
from bench.load import open_loop, session, summary_ms


async def _wait_idle(conn: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await unfinished(conn):
        if time.monotonic() > deadline:
            raise BenchError(f"latency: jobs still unfinished after {timeout_s:g}s")
        await asyncio.sleep(0.05)


async def run_phase(ctx: Context) -> dict[str, Any]:
    rate, duration = ctx.options.latency_rate, ctx.options.latency_duration_s
    async with ctx.database("latency") as url, ctx.stack("latency", "latency", url) as stack:
        services = [stack.start("api"), stack.start("scheduler"), stack.start("worker")]
        await stack.ready(*services)
        conn = await asyncpg.connect(url)
        try:
            async with session(64) as http:
                create = stack.api_url + "/api/v1/jobs"
                await open_loop(http, create, rate, min(1.0, duration))  # warm-up
                await _wait_idle(conn, 30.0)
                meter = CpuMeter(stack.roles(), ctx.servers.pids)
                result = await open_loop(http, create, rate, duration, keep_ids=True)
            await _wait_idle(conn, 60.0)
            cpu = meter.stop()
            stack.check_alive()
            rows = await conn.fetch(
                "SELECT extract(epoch FROM scheduled_at - created_at) AS claim,"
                " extract(epoch FROM started_at - created_at) AS start,"
                " extract(epoch FROM completed_at - created_at) AS finish"
                " FROM jobs WHERE id = ANY($1::text[]) AND state = 'SUCCEEDED'",
                result.ids,
            )
        finally:
            await conn.close()
    if not rows:
        raise BenchError(
            f"latency: no job succeeded ({result.errors} errors: {result.error_samples})"
        )
    start_ms = summary_ms([float(row["start"]) for row in rows])
    finish_ms = summary_ms([float(row["finish"]) for row in rows])
    claim_ms = summary_ms([float(row["claim"]) for row in rows])
    print(
        f"  latency at {rate:g} jobs/s: create->start p50 {start_ms['p50']:.1f} ms, "
        f"p99 {start_ms['p99']:.1f} ms (create->claim p50 {claim_ms['p50']:.1f} ms, "
        f"p99 {claim_ms['p99']:.1f} ms); create->finish p50 {finish_ms['p50']:.1f} ms, "
        f"p99 {finish_ms['p99']:.1f} ms",
        flush=True,
    )
    return {
        "rate": rate,
        "duration_s": duration,
        "jobs": len(rows),
        "errors": result.errors,
        "offered_rate": round(result.offered_rate, 1),
        "create_to_claim_ms": claim_ms,
        "create_to_start_ms": start_ms,
        "create_to_finish_ms": finish_ms,
        "http_create_ms": summary_ms(result.latencies_s) if result.latencies_s else None,
        "cpu_s": cpu,
    }
