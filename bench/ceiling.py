"""Phase 6, the ceiling: what PostgreSQL and asyncpg do on this machine without the framework.

On the same schema (a fresh database from the same migrations):

- claim + complete: loops that claim ``ceiling_batch`` due jobs with
  ``UPDATE ... FOR UPDATE SKIP LOCKED RETURNING`` (PENDING → RUNNING, attempt
  + 1) and mark them SUCCEEDED with one ``UPDATE ... FROM unnest``, until none is
  left. ``ceiling_connections`` loops (one connection each) per process, in 1
  and in 2 processes (``multiprocessing``, spawned), over ``ceiling_jobs`` jobs.
  No NATS, no per-job round trip: the most a PostgreSQL-backed queue could do here.
- inserts: single-row INSERTs on one connection (each its own transaction, so
  one WAL flush after another: the commit rate of this disk), single-row
  INSERTs over the API's pool size of connections (commits can share a
  flush), unnest INSERTs of the bulk batch size, and COPY.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import queue
import time
from typing import Any

import asyncpg
from orchestrix import ids

from bench.context import Context
from bench.infra import BenchError, CpuMeter, checkpoint, fresh_jobs, insert_noop_jobs

CLAIM = """
WITH due AS (
    SELECT id FROM jobs
    WHERE state IN ('PENDING', 'RETRYING') AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs
SET state = 'RUNNING', attempt = jobs.attempt + 1, scheduled_at = now(),
    started_at = now(), updated_at = now()
FROM due
WHERE jobs.id = due.id
RETURNING jobs.id, jobs.attempt
"""

COMPLETE = """
UPDATE jobs
SET state = 'SUCCEEDED', completed_at = now(), updated_at = now()
FROM unnest($1::text[], $2::int[]) AS done(id, attempt)
WHERE jobs.id = done.id AND jobs.attempt = done.attempt AND jobs.state = 'RUNNING'
"""

COPY_CHUNK = 10_000


async def _claim_loop(conn: Any, batch: int) -> int:
    done = 0
    while True:
        rows = await conn.fetch(CLAIM, batch)
        if not rows:
            return done
        await conn.execute(COMPLETE, [r["id"] for r in rows], [r["attempt"] for r in rows])
        done += len(rows)


async def _process_body(
    url: str, batch: int, connections: int, barrier: multiprocessing.synchronize.Barrier
) -> tuple[float, float, int]:
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:
        barrier.wait(timeout=60)  # every process connected: start together
        started = time.monotonic()
        counts = await asyncio.gather(*(_claim_loop(conn, batch) for conn in conns))
        return started, time.monotonic(), sum(counts)
    finally:
        for conn in conns:
            await conn.close()


def _process_main(
    url: str,
    batch: int,
    connections: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[tuple[float, float, int]],
) -> None:
    results.put(asyncio.run(_process_body(url, batch, connections, barrier)))


async def claim_complete(
    url: str, processes: int, batch: int, connections: int, timeout_s: float
) -> dict[str, Any]:
    """Drain the table with raw claim+complete loops in ``processes`` processes."""
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(processes + 1)
    results: multiprocessing.Queue[tuple[float, float, int]] = spawn.Queue()
    children = [
        spawn.Process(
            target=_process_main,
            args=(url, batch, connections, barrier, results),
            name=f"bench-ceiling-{n}",
            daemon=True,
        )
        for n in range(processes)
    ]
    for child in children:
        child.start()
    try:
        await asyncio.to_thread(barrier.wait, 60)
        outcomes: list[tuple[float, float, int]] = []
        deadline = time.monotonic() + timeout_s
        while len(outcomes) < processes:
            try:
                outcomes.append(await asyncio.to_thread(results.get, True, 1.0))
            except queue.Empty:
                if time.monotonic() > deadline or any(
                    c.exitcode not in (None, 0) for c in children
                ):
                    raise BenchError("ceiling: a claim process failed or timed out") from None
        for child in children:
            await asyncio.to_thread(child.join, 10)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(5)
    first = min(started for started, _, _ in outcomes)
    last = max(ended for _, ended, _ in outcomes)
    jobs = sum(count for _, _, count in outcomes)
    return {
        "processes": processes,
        "connections_per_process": connections,
        "batch": batch,
        "jobs": jobs,
        "seconds": round(last - first, 3),
        "jobs_per_s": round(jobs / (last - first), 1) if last > first else 0.0,
    }


async def _single_inserts(url: str, rows: int, connections: int) -> float:
    job_ids = [ids.new_id() for _ in range(rows)]
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:

        async def one(conn: Any, part: list[str]) -> None:
            for job_id in part:
                await conn.execute("INSERT INTO jobs (id, type) VALUES ($1, 'noop')", job_id)

        started = time.monotonic()
        await asyncio.gather(*(one(conn, job_ids[n::connections]) for n, conn in enumerate(conns)))
        return rows / (time.monotonic() - started)
    finally:
        for conn in conns:
            await conn.close()


async def _unnest_inserts(url: str, rows: int, batch: int, connections: int) -> float:
    job_ids = [ids.new_id() for _ in range(rows)]
    chunks = [job_ids[n : n + batch] for n in range(0, rows, batch)]
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:

        async def some(conn: Any, parts: list[list[str]]) -> None:
            for part in parts:
                await conn.execute(
                    "INSERT INTO jobs (id, type) SELECT * FROM unnest($1::text[], $2::text[])",
                    part,
                    ["noop"] * len(part),
                )

        started = time.monotonic()
        await asyncio.gather(*(some(conn, chunks[n::connections]) for n, conn in enumerate(conns)))
        return rows / (time.monotonic() - started)
    finally:
        for conn in conns:
            await conn.close()


async def _copy_inserts(url: str, rows: int) -> float:
    records = [(ids.new_id(), "noop") for _ in range(rows)]
    conn = await asyncpg.connect(url)
    try:
        started = time.monotonic()
        for first in range(0, rows, COPY_CHUNK):
            await conn.copy_records_to_table(
                "jobs", records=records[first : first + COPY_CHUNK], columns=["id", "type"]
            )
        return rows / (time.monotonic() - started)
    finally:
        await conn.close()


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    claim_runs = []
    async with ctx.database("ceiling") as url:
        for processes in (1, 2):
            await fresh_jobs(url)
            conn = await asyncpg.connect(url)
            try:
                await insert_noop_jobs(conn, o.ceiling_jobs)
                await conn.execute("VACUUM ANALYZE jobs")
            finally:
                await conn.close()
            await checkpoint(url)
            meter = CpuMeter({}, ctx.servers.pids)
            run = await claim_complete(
                url, processes, o.ceiling_batch, o.ceiling_connections, o.phase_timeout_s
            )
            run["cpu_s"] = meter.stop()
            claim_runs.append(run)
            print(
                f"  ceiling, raw asyncpg claim+complete, {processes} process(es): "
                f"{run['jobs_per_s']:,.0f} jobs/s",
                flush=True,
            )

        await fresh_jobs(url)
        # One connection, one row per transaction: one WAL flush after another.
        serial = await _single_inserts(url, max(100, o.insert_single // 4), 1)
        await fresh_jobs(url)
        single = await _single_inserts(url, o.insert_single, o.insert_single_connections)
        await fresh_jobs(url)
        unnest = await _unnest_inserts(url, o.insert_bulk, o.bulk_size, o.bulk_clients)
        await fresh_jobs(url)
        copy = await _copy_inserts(url, o.insert_bulk)
    inserts = {
        "serial_commits": {
            "rows": max(100, o.insert_single // 4),
            "connections": 1,
            "rows_per_s": round(serial, 1),
        },
        "single": {
            "rows": o.insert_single,
            "connections": o.insert_single_connections,
            "rows_per_s": round(single, 1),
        },
        "unnest": {
            "rows": o.insert_bulk,
            "batch": o.bulk_size,
            "connections": o.bulk_clients,
            "rows_per_s": round(unnest, 1),
        },
        "copy": {"rows": o.insert_bulk, "chunk": COPY_CHUNK, "rows_per_s": round(copy, 1)},
    }
    print(
        f"  ceiling, inserts: single {single:,.0f}/s, unnest {unnest:,.0f}/s, COPY {copy:,.0f}/s",
        flush=True,
    )
    return {"claim_complete": claim_runs, "inserts": inserts}
