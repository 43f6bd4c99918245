"""Phase 1, end-to-end drain: the services started, then N no-op jobs inserted at once.

The scheduler and k workers are started and waited for (workers claim their
own jobs, so none may see a job before all are up). Then the jobs go in with
one unnest INSERT per 10,000, in one transaction with ANALYZE: every worker
sees them at the same moment, the commit, and the drain runs with all k workers
from its first job. (The claim-cost phase drains a table filled beforehand.)
The rate is taken from the jobs' own timestamps: N / (max(completed_at) -
min(started_at)). The wall time from the commit to the last SUCCEEDED seen
(polled every 0.1 s) is reported beside it. CPU time per process group is
counted from the first claim to the end, so start-up costs are left out.

``drain_rounds`` (2) rounds go through 1, 2 and 4 workers in turn; each count's
best round is the result (a disturbance from elsewhere only ever slows a run
down), and every round's figure is kept in the JSON. Each run also samples
``pg_stat_activity`` every 20 ms: the share of busy backends by wait event
(``IO:WalSync``, ``LWLock:WALWrite``, ``CPU`` when not waiting) shows where
PostgreSQL's side of a job goes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from bench.context import Context
from bench.infra import CpuMeter, insert_noop_jobs, sampling, unfinished

POLL_S = 0.1
# Cheap on any table size (the (state, id) index): a claim has happened once a
# job is announced or running, or once none is pending any more.
_CLAIMED_ANY = (
    "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'RUNNING')"
    " OR NOT EXISTS (SELECT 1 FROM jobs WHERE state = 'PENDING')"
)


@dataclass
class DrainRun:
    workers: int
    jobs: int
    succeeded: int = 0
    finished: bool = False
    jobs_per_s: float = 0.0  # from the jobs' timestamps
    span_s: float = 0.0  # max(completed_at) - min(started_at)
    wall_s: float = 0.0  # jobs visible (or workers up) -> last SUCCEEDED seen
    wall_jobs_per_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Share of samples of the database's active client backends, by wait event
    # ("CPU" when not waiting): where PostgreSQL's time goes during the drain.
    pg_waits: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_WAITS = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS what
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND state = 'active' AND pid <> pg_backend_pid()
"""


async def drain(
    ctx: Context,
    phase: str,
    label: str,
    db_url: str,
    *,
    workers: int,
    jobs: int,
    insert: bool = True,
) -> DrainRun:
    """Insert ``jobs`` noop jobs into ``db_url`` (unless ``insert`` is false: the caller
    did), then run 1 scheduler + ``workers`` workers until every job has finished."""
    run = DrainRun(workers=workers, jobs=jobs)
    conn = await asyncpg.connect(db_url)
    try:
        # Only this drain's jobs count: a table drained before holds finished noop
        # jobs of earlier rounds, whose times would stretch the span.
        first_id = await conn.fetchval(
            "SELECT min(id) FROM jobs WHERE state = 'PENDING'" if not insert else "SELECT NULL"
        )
        async with ctx.stack(phase, label, db_url) as stack:
            started = [stack.start("scheduler")] + [stack.start("worker") for _ in range(workers)]
            await stack.ready(*started)
            if insert:
                async with conn.transaction():
                    await insert_noop_jobs(conn, jobs)
                    await conn.execute("ANALYZE jobs")
                    first_id = await conn.fetchval(
                        "SELECT min(id) FROM jobs WHERE state = 'PENDING'"
                    )
            launched = time.monotonic()
            deadline = launched + 60.0 + jobs / 50.0
            # CPU is counted from the first claim: the scheduler's start-up is not the drain's.
            while not await conn.fetchval(_CLAIMED_ANY) and time.monotonic() < deadline:
                stack.check_alive()
                await asyncio.sleep(0.01)
            meter = CpuMeter(stack.roles(), ctx.servers.pids)
            # Every 20 ms: what each busy backend of the database is doing.
            async with sampling(db_url, _WAITS, 0.02) as samples:
                while True:
                    stack.check_alive()
                    if not await unfinished(conn):
                        run.finished = True
                        break
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(POLL_S)
            run.wall_s = round(time.monotonic() - launched, 3)
            run.cpu_s = meter.stop()
            waits = Counter(what for sample in samples for what in sample)
            total = sum(waits.values()) or 1
            run.pg_waits = {k: round(n / total, 3) for k, n in waits.most_common(8)}
        run.peak_rss_mib = {
            report.name: report.peak_rss_mib for report in stack.reports if report.role != "api"
        }
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE state = 'SUCCEEDED') AS ok,"
            " extract(epoch FROM max(completed_at) - min(started_at)) AS span"
            " FROM jobs WHERE type = 'noop' AND id >= $1",
            first_id or "",
        )
    finally:
        await conn.close()
    run.succeeded = row["ok"]
    span = float(row["span"] or 0.0)
    run.span_s = round(span, 4)
    run.jobs_per_s = round(run.succeeded / span, 1) if span > 0 else 0.0
    run.wall_jobs_per_s = round(run.succeeded / run.wall_s, 1) if run.wall_s > 0 else 0.0
    return run


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    rounds: dict[int, list[DrainRun]] = {workers: [] for workers in o.drain_workers}
    # Rounds go through every worker count in turn, so that a disturbance from
    # elsewhere on the machine hits them alike; the best round of each counts.
    for round_ in range(o.drain_rounds):
        for workers in o.drain_workers:
            async with ctx.database(f"drain{workers}") as url:
                run = await drain(
                    ctx,
                    "drain",
                    f"drain-{workers}w-{round_ + 1}",
                    url,
                    workers=workers,
                    jobs=o.jobs,
                )
            rounds[workers].append(run)
            print(
                f"  drain, {workers} worker(s), round {round_ + 1}: {run.jobs_per_s:,.0f} jobs/s "
                f"(wall {run.wall_s:.1f} s: "
                f"{run.wall_jobs_per_s:,.0f} jobs/s)"
                + ("" if run.finished else f"  UNFINISHED: {run.succeeded}/{run.jobs}"),
                flush=True,
            )
    runs = []
    for done in rounds.values():
        best = max(done, key=lambda r: r.jobs_per_s)
        runs.append({**best.to_json(), "jobs_per_s_each_round": [r.jobs_per_s for r in done]})
    return {"jobs": o.jobs, "rounds": o.drain_rounds, "runs": runs}
