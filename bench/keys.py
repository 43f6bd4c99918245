"""Concurrency keys: what the limit costs a drain, and whether a key's backlog holds
other keys back.

- drain: ``jobs`` (20,000) no-op jobs, spread over ``keys_count`` (100) keys with a
  limit of ``keys_limit`` (5) each, drained by ``history_workers`` (2) workers;
  beside the same drain without keys, in the order plain, keyed, keyed, plain, ...
  (``drain_rounds``), best of each. The issue asks for at least 80 % of the plain
  drain.
- backlog: one key holds ``dispatch_backlog`` (100,000) demo jobs of 100 ms under a
  limit of 50, while 10 other keys receive 5 jobs/s each over the API for
  ``fair_duration_s`` (10 s). Those jobs' create->start must stay under 1 s at p99.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson

from bench.context import Context
from bench.dispatch import _busy, _create_to_start, _start_stack, _until
from bench.drain import DrainRun, drain
from bench.infra import BenchError, insert_noop_jobs
from bench.load import JSON, session, summary_ms

OTHER_KEYS = 10
OTHER_RATE = 5.0  # jobs/s per key


async def _keyed_noop_jobs(conn: Any, count: int, keys: int, limit: int) -> None:
    from orchestrix import ids

    await conn.execute("INSERT INTO queues (name, key_limit) VALUES ('default', $1)", limit)
    for first in range(0, count, 10_000):
        n = min(10_000, count - first)
        await conn.execute(
            "INSERT INTO jobs (id, type, concurrency_key)"
            " SELECT id, 'noop', 'k' || (n % $2) FROM unnest($1::text[]) WITH ORDINALITY"
            " AS t(id, n)",
            [ids.new_id() for _ in range(n)],
            keys,
        )


async def _drain(ctx: Context, keyed: bool, round_: int) -> DrainRun:
    o = ctx.options
    side = "keyed" if keyed else "plain"
    async with ctx.database(f"keys_{side}") as url:
        conn = await asyncpg.connect(url)
        try:
            if keyed:
                await _keyed_noop_jobs(conn, o.jobs, o.keys_count, o.keys_limit)
            else:
                await insert_noop_jobs(conn, o.jobs)
            await conn.execute("ANALYZE jobs")
        finally:
            await conn.close()
        return await drain(
            ctx,
            "keys",
            f"keys-{side}-{round_ + 1}",
            url,
            workers=o.history_workers,
            jobs=o.jobs,
            insert=False,
        )


async def _backlog(ctx: Context) -> dict[str, Any]:
    from bench.dispatch import insert_demo_jobs

    o = ctx.options
    async with ctx.database("keys_backlog") as url, ctx.stack("keys", "keys-backlog", url) as stack:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("INSERT INTO queues (name, key_limit) VALUES ('default', 50)")
            await insert_demo_jobs(conn, o.dispatch_backlog, sleep_ms=100)
            await conn.execute("UPDATE jobs SET concurrency_key = 'big'")
            await conn.execute("ANALYZE jobs")
            await _start_stack(stack, 2)
            await _until(lambda: _busy(conn, 50), 60.0, "the big key at its limit")
            ids: list[str] = []
            errors = 0
            gap = 1.0 / (OTHER_RATE * OTHER_KEYS)
            async with session(16) as http:

                async def post(key: int) -> None:
                    nonlocal errors
                    body = orjson.dumps(
                        {
                            "type": "demo_job",
                            "concurrency_key": f"small-{key}",
                            "payload": {"sleep_ms": 5},
                        }
                    )
                    async with http.post(
                        stack.api_url + "/api/v1/jobs", data=body, headers=JSON
                    ) as response:
                        if response.status == 201:
                            ids.append((await response.json())["id"])
                        else:
                            errors += 1

                tasks = []
                began = time.monotonic()
                n = 0
                while time.monotonic() - began < o.fair_duration_s:
                    tasks.append(asyncio.create_task(post(n % OTHER_KEYS)))
                    n += 1
                    await asyncio.sleep(max(0.0, began + n * gap - time.monotonic()))
                await asyncio.gather(*tasks)
            if not ids:
                raise BenchError("keys: no job of the small keys was created")
            most = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE concurrency_key = 'big' AND state = 'RUNNING'"
            )
            waits = await _create_to_start(conn, ids, 60.0)
            stack.check_alive()
        finally:
            await conn.close()
    latency = summary_ms(waits)
    print(
        f"  {OTHER_KEYS} keys at {OTHER_RATE:g} jobs/s each beside one key's "
        f"{o.dispatch_backlog:,} (limit 50): create->start p50 {latency['p50']:.1f} ms, "
        f"p99 {latency['p99']:.1f} ms",
        flush=True,
    )
    return {
        "backlog": o.dispatch_backlog,
        "jobs": len(ids),
        "errors": errors,
        "create_to_start_ms": latency,
        "big_key_running_at_end": most,
    }


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    runs: dict[str, list[DrainRun]] = {"plain": [], "keyed": []}
    for round_ in range(o.drain_rounds):
        # plain, keyed, then keyed, plain, ...: neither always runs first.
        for keyed in (False, True) if round_ % 2 == 0 else (True, False):
            run = await _drain(ctx, keyed, round_)
            side = "keyed" if keyed else "plain"
            runs[side].append(run)
            print(
                f"  drain {side}, round {round_ + 1}: {run.jobs_per_s:,.0f} jobs/s"
                + (f" ({o.keys_count} keys, limit {o.keys_limit})" if keyed else "")
                + ("" if run.finished else f"  UNFINISHED: {run.succeeded}/{run.jobs}"),
                flush=True,
            )
    best = {side: max(done, key=lambda r: r.jobs_per_s) for side, done in runs.items()}
    plain, limited = best["plain"].jobs_per_s, best["keyed"].jobs_per_s
    return {
        "jobs": o.jobs,
        "keys": o.keys_count,
        "limit": o.keys_limit,
        "workers": o.history_workers,
        "plain_jobs_per_s": plain,
        "keyed_jobs_per_s": limited,
        "each_round": {side: [r.jobs_per_s for r in done] for side, done in runs.items()},
        "ratio": round(limited / plain, 3) if plain else None,
        "backlog": await _backlog(ctx),
    }
