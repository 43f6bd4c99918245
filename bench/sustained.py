"""Phase 2, sustained: jobs created over the API at a fixed offered rate while they run.

API + 1 scheduler + ``sustained_workers`` (2) workers. The open-loop generator
offers each rate of ``sustained_rates`` for ``sustained_step_s`` seconds, from an
empty backlog; the backlog (jobs created but not finished) is sampled every
0.5 s and right when the window closes. A step is *held* when

- the generator issued at least 95 % of the rate (else it is the limit, not Orchestrix),
- the API answered 201 to at least 95 % of the rate inside the window,
- at most 1 % of requests failed,
- the backlog at the end of the window is at most one second's worth of jobs.

Stepping stops at the first rate not held; then ``sustained_refine`` bisection
steps between the last held and the first failed rate narrow it down. The result
is the highest rate held, with the rate the generator actually achieved.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from bench.context import Context
from bench.infra import CpuMeter, Stack, backlog, unfinished
from bench.load import open_loop, session, summary_ms

SAMPLE_S = 0.5
DRAIN_WAIT_S = 60.0
CONNECTIONS = 1024


async def _wait_empty(conn: Any, stack: Stack, timeout_s: float) -> float | None:
    """Seconds until the backlog is empty; None if it is not within ``timeout_s``."""
    started = time.monotonic()
    while await unfinished(conn):
        stack.check_alive()
        if time.monotonic() - started > timeout_s:
            return None
        await asyncio.sleep(0.1)
    return round(time.monotonic() - started, 2)


async def _step(ctx: Context, stack: Stack, conn: Any, http: Any, rate: float) -> dict[str, Any]:
    duration = ctx.options.sustained_step_s
    samples: list[tuple[float, int]] = []
    began = time.monotonic()
    start_backlog = await backlog(conn)
    # The sampler and the window's end share one connection: one query at a time.
    one_at_a_time = asyncio.Lock()

    async def count() -> int:
        async with one_at_a_time:
            return await backlog(conn)

    async def sample() -> None:
        while True:
            samples.append((round(time.monotonic() - began, 2), await count()))
            await asyncio.sleep(SAMPLE_S)

    end_backlog = -1

    async def at_end() -> None:
        nonlocal end_backlog
        end_backlog = await count()

    meter = CpuMeter(stack.roles(), ctx.servers.pids)
    sampler = asyncio.create_task(sample())
    try:
        result = await open_loop(
            http, stack.api_url + "/api/v1/jobs", rate, duration, at_window_end=at_end
        )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    cpu = meter.stop()
    stack.check_alive()
    reasons = []
    if result.offered_rate < 0.95 * rate:
        reasons.append("generator could not offer the rate")
    if result.accepted_rate < 0.95 * rate:
        reasons.append("API accepted less than 95% of the rate")
    if result.errors > 0.01 * result.issued:
        reasons.append(f"{result.errors} errors")
    if end_backlog > rate * 1.0:
        reasons.append("backlog above 1 s of jobs")
    drained = await _wait_empty(conn, stack, DRAIN_WAIT_S)
    step = {
        "rate": rate,
        "duration_s": duration,
        "held": not reasons,
        "why_not": reasons,
        "offered_rate": round(result.offered_rate, 1),
        "accepted_rate": round(result.accepted_rate, 1),
        "issued": result.issued,
        "created": result.created,
        "errors": result.errors,
        "error_samples": result.error_samples,
        "backlog_start": start_backlog,
        "backlog_end": end_backlog,
        "backlog_samples": samples,
        "drained_after_s": drained,
        "http_create_ms": summary_ms(result.latencies_s) if result.latencies_s else None,
        "client_cores": result.client_cores,
        "cpu_s": cpu,
    }
    verdict = "held" if not reasons else "NOT held: " + "; ".join(reasons)
    print(
        f"  sustained {rate:,.0f} jobs/s: offered {result.offered_rate:,.0f}/s, "
        f"accepted {result.accepted_rate:,.0f}/s, backlog {start_backlog} -> {end_backlog}: "
        f"{verdict}",
        flush=True,
    )
    return step


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    steps: list[dict[str, Any]] = []
    held: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    async with ctx.database("sustained") as url, ctx.stack("sustained", "sustained", url) as stack:
        services = [stack.start("api"), stack.start("scheduler")]
        services += [stack.start("worker") for _ in range(o.sustained_workers)]
        await stack.ready(*services)
        conn = await asyncpg.connect(url)
        try:
            async with session(CONNECTIONS) as http:
                # Warm-up: open connections, fill caches.
                await open_loop(http, stack.api_url + "/api/v1/jobs", o.sustained_rates[0], 0.5)
                await _wait_empty(conn, stack, DRAIN_WAIT_S)

                async def measure(rate: float) -> dict[str, Any]:
                    nonlocal held, failed
                    step = await _step(ctx, stack, conn, http, rate)
                    steps.append(step)
                    if step["held"]:
                        held = step
                    else:
                        failed = step
                    return step

                for rate in o.sustained_rates:
                    step = await measure(rate)
                    if not step["held"]:
                        break
                for _ in range(o.sustained_refine):
                    if held is None or failed is None or step["drained_after_s"] is None:
                        break
                    rate = round((held["rate"] + failed["rate"]) / 2, -1)
                    if rate in (held["rate"], failed["rate"]):
                        break
                    step = await measure(rate)
        finally:
            await conn.close()
    return {
        "workers": o.sustained_workers,
        "step_s": o.sustained_step_s,
        "held_rate": held["rate"] if held else 0.0,
        "held_offered_rate": held["offered_rate"] if held else 0.0,
        "held_accepted_rate": held["accepted_rate"] if held else 0.0,
        "first_failed_rate": failed["rate"] if failed else None,
        "steps": steps,
    }
