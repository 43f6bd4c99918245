"""Bulk actions: one call that retries, then one that cancels, ``bulk_action_jobs``
(100,000) jobs, while 2 workers drain a backlog of no-op jobs.

The jobs acted on are FAILED jobs of a type no worker runs (``bulk_target``), so
that, retried, they wait PENDING without joining the drain; the cancel then
selects them by that type. Measured: each call's duration (the issue asks for
under 10 s for 100,000 jobs), what it changed, and what the drain did meanwhile
from the jobs' started_at: the starts per second during the call against the
second before it, and the longest gap between two starts during the call (a
stalled claim would show as a gap).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson

from bench.context import Context
from bench.dispatch import _busy, _start_stack, _until
from bench.infra import BenchError, insert_noop_jobs
from bench.load import JSON, session

TARGET = "bulk_target"
WORKERS = 2


async def _failed_jobs(conn: Any, count: int) -> None:
    from orchestrix import ids

    for first in range(0, count, 10_000):
        n = min(10_000, count - first)
        await conn.execute(
            "INSERT INTO jobs (id, type, state, attempt, max_attempts, completed_at, last_error)"
            " SELECT id, $2, 'FAILED', 3, 3, now(), 'boom' FROM unnest($1::text[]) AS t(id)",
            [ids.new_id() for _ in range(n)],
            TARGET,
        )


async def _during(conn: Any, began: float, ended: float) -> dict[str, Any]:
    """The drain's starts in the second before the call and during it."""
    rows = await conn.fetch(
        "SELECT extract(epoch FROM started_at)::float8 AS t FROM jobs"
        " WHERE type = 'noop' AND started_at BETWEEN to_timestamp($1) AND to_timestamp($2)"
        " ORDER BY started_at",
        began - 1.0,
        ended,
    )
    times = [row["t"] for row in rows]
    before = sum(1 for t in times if t < began)
    inside = [t for t in times if t >= began]
    gaps = [b - a for a, b in zip([began, *inside], [*inside, ended], strict=True)]
    span = max(ended - began, 1e-6)
    later = await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE type = 'noop'"
        " AND (started_at IS NULL OR started_at > to_timestamp($1))",
        ended,
    )
    return {
        "drain_went_on": later > 0,  # else the backlog ran out during the call
        "drain_before_per_s": before,
        "drain_during_per_s": round(len(inside) / span, 1),
        "longest_gap_ms": round(max(gaps) * 1000, 1),
    }


async def _call(http: Any, url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    began = time.time()
    async with http.post(url, data=orjson.dumps(body), headers=JSON) as response:
        answer = await response.json()
        if response.status != 200:
            raise BenchError(f"bulk: {url} answered {response.status}: {answer}")
    return began, answer


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    count = o.bulk_action_jobs
    async with ctx.database("bulk") as url, ctx.stack("bulk", "bulk", url) as stack:
        conn = await asyncpg.connect(url)
        try:
            await _failed_jobs(conn, count)
            await insert_noop_jobs(conn, o.bulk_drain_jobs)
            await conn.execute("ANALYZE jobs")
            await _start_stack(stack, WORKERS)
            await _until(lambda: _busy(conn, 1), 60.0, "the drain to start")
            await asyncio.sleep(1.5)  # the drain at speed
            results: dict[str, Any] = {"jobs": count}
            async with session(1) as http:
                for action, path, body, key in (
                    ("retry", "/api/v1/jobs/retry", {"type": TARGET, "state": "FAILED"}, "retried"),
                    ("cancel", "/api/v1/jobs/cancel", {"type": TARGET}, "cancelled"),
                ):
                    began, answer = await _call(http, stack.api_url + path, body)
                    ended = time.time()
                    changed = int(answer[key])
                    if changed != count:
                        raise BenchError(f"bulk {action}: changed {changed} of {count} jobs")
                    results[action] = {
                        "seconds": round(ended - began, 2),
                        "changed": changed,
                        **await _during(conn, began, ended),
                    }
            left = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE type = 'noop' AND started_at IS NULL"
            )
            stack.check_alive()
        finally:
            await conn.close()
    if left == o.bulk_drain_jobs:
        raise BenchError("bulk: the drain never ran")
    for action in ("retry", "cancel"):
        r = results[action]
        print(
            f"  bulk {action} of {count:,} jobs: {r['seconds']:.2f} s; drain meanwhile "
            f"{r['drain_during_per_s']:,.0f} starts/s (the second before: "
            f"{r['drain_before_per_s']:,}), longest gap between starts "
            f"{r['longest_gap_ms']:.0f} ms"
            + ("" if r["drain_went_on"] else " (the backlog ran out during the call)"),
            flush=True,
        )
    results["drain_left_unstarted"] = left
    return results
