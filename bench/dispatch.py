"""Phases "priority" and "fairness": does dispatch decide late, when a slot is free?

priority: ``dispatch_backlog`` (100,000) due ``demo_job`` jobs of priority 0 that
each sleep 5 ms, inserted straight into the table; API + 1 scheduler + 2
workers start on them. Once both workers are busy, ``priority_jobs`` (20) jobs
of priority 100 are created one by one over the API, ``priority_gap_s`` apart.
Their create->start (``started_at - created_at``, PostgreSQL's clock) must stay
under 1 s at p99 however long the backlog behind which they were created.

fairness: queue ``bulk`` holds ``dispatch_backlog`` jobs of 50 ms while queue
``interactive`` receives ``fair_rate`` (20) jobs/s over the API for
``fair_duration_s`` (10 s). Interactive's create->start must stay under 1 s at
p99, and bulk must keep draining meanwhile (its jobs finished per second in the
window are reported).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson

from bench.context import Context
from bench.infra import BenchError, Stack
from bench.load import open_loop, session, summary_ms

INSERT_CHUNK = 10_000


async def insert_demo_jobs(
    conn: Any, count: int, *, sleep_ms: int, queue: str = "default", priority: int = 0
) -> None:
    """``count`` due demo_job jobs that sleep ``sleep_ms``, in chunks, by SQL."""
    from orchestrix import ids

    payload = orjson.dumps({"sleep_ms": sleep_ms}).decode()
    for first in range(0, count, INSERT_CHUNK):
        n = min(INSERT_CHUNK, count - first)
        await conn.execute(
            "INSERT INTO jobs (id, type, queue, priority, payload)"
            " SELECT id, 'demo_job', $2, $3, $4::jsonb FROM unnest($1::text[]) AS t(id)",
            [ids.new_id() for _ in range(n)],
            queue,
            priority,
            payload,
        )


async def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _start_stack(stack: Stack, workers: int) -> None:
    services = [stack.start("api"), stack.start("scheduler")]
    services += [stack.start("worker") for _ in range(workers)]
    await stack.ready(*services)


async def _create_to_start(conn: Any, job_ids: list[str], timeout_s: float) -> list[float]:
    """Each job's create->start in seconds, once all of them started."""

    async def started() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::text[]) AND started_at IS NOT NULL",
            job_ids,
        )
        return bool(n == len(job_ids))

    await _until(started, timeout_s, f"{len(job_ids)} jobs to start")
    rows = await conn.fetch(
        "SELECT extract(epoch FROM started_at - created_at) AS s FROM jobs"
        " WHERE id = ANY($1::text[])",
        job_ids,
    )
    return [float(row["s"]) for row in rows]


async def _busy(conn: Any, at_least: int) -> bool:
    running = await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'RUNNING'")
    return bool(running >= at_least)


async def run_priority(ctx: Context) -> dict[str, Any]:
    backlog, count, gap_s = (
        ctx.options.dispatch_backlog,
        ctx.options.priority_jobs,
        ctx.options.priority_gap_s,
    )
    workers = 2
    async with ctx.database("priority") as url, ctx.stack("priority", "priority", url) as stack:
        conn = await asyncpg.connect(url)
        try:
            await insert_demo_jobs(conn, backlog, sleep_ms=5)
            await conn.execute("ANALYZE jobs")
            await _start_stack(stack, workers)
            await _until(lambda: _busy(conn, workers * 50), 60.0, "both workers busy")
            ids: list[str] = []
            async with session(4) as http:
                for _ in range(count):
                    body = {"type": "demo_job", "priority": 100, "payload": {"sleep_ms": 5}}
                    async with http.post(stack.api_url + "/api/v1/jobs", json=body) as response:
                        if response.status != 201:
                            raise BenchError(f"priority: create answered {response.status}")
                        ids.append((await response.json())["id"])
                    await asyncio.sleep(gap_s)
            waits = await _create_to_start(conn, ids, 60.0)
            behind = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE state IN ('PENDING', 'RETRYING')"
            )
            stack.check_alive()
        finally:
            await conn.close()
    latency = summary_ms(waits)
    print(
        f"  priority 100 behind {backlog:,} due jobs of 5 ms, {workers} workers: "
        f"create->start p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms "
        f"({behind:,} jobs still waiting behind them at the end)",
        flush=True,
    )
    return {
        "backlog": backlog,
        "workers": workers,
        "jobs": count,
        "create_to_start_ms": latency,
        "backlog_left": behind,
    }


async def run_fairness(ctx: Context) -> dict[str, Any]:
    backlog, rate, duration = (
        ctx.options.dispatch_backlog,
        ctx.options.fair_rate,
        ctx.options.fair_duration_s,
    )
    workers = 2
    bulk_done = "SELECT count(*) FROM jobs WHERE queue = 'bulk' AND state = 'SUCCEEDED'"
    async with ctx.database("fairness") as url, ctx.stack("fairness", "fairness", url) as stack:
        conn = await asyncpg.connect(url)
        try:
            await insert_demo_jobs(conn, backlog, sleep_ms=50, queue="bulk")
            await conn.execute("ANALYZE jobs")
            await _start_stack(stack, workers)
            await _until(lambda: _busy(conn, workers * 50), 60.0, "both workers busy")
            done_before = await conn.fetchval(bulk_done)
            began = time.monotonic()
            body = orjson.dumps(
                {"type": "demo_job", "queue": "interactive", "payload": {"sleep_ms": 5}}
            )
            async with session(16) as http:
                result = await open_loop(
                    http, stack.api_url + "/api/v1/jobs", rate, duration, keep_ids=True, body=body
                )
            window_s = time.monotonic() - began
            done_after = await conn.fetchval(bulk_done)
            if not result.ids:
                raise BenchError(f"fairness: no job created ({result.error_samples})")
            waits = await _create_to_start(conn, result.ids, 60.0)
            stack.check_alive()
        finally:
            await conn.close()
    latency = summary_ms(waits)
    bulk_rate = (done_after - done_before) / window_s
    print(
        f"  interactive at {rate:g} jobs/s beside {backlog:,} bulk jobs of 50 ms: "
        f"create->start p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms; "
        f"bulk drained {bulk_rate:,.0f} jobs/s meanwhile",
        flush=True,
    )
    return {
        "backlog": backlog,
        "workers": workers,
        "rate": rate,
        "duration_s": duration,
        "jobs": len(result.ids),
        "errors": result.errors,
        "create_to_start_ms": latency,
        "bulk_jobs_per_s": round(bulk_rate, 1),
    }
