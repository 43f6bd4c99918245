"""The cost of history: the drain with every state change's event, and without.

Every move of a job writes its event (orchestrix.db.events) in the same
statement. To show what that costs, this phase drains the same number of no-op
jobs with ``history_workers`` workers twice per round: on a database as the
engine runs it, and on one where ``orchestrix.history`` is set to ``off`` (the
benchmark's switch: its moves then write no events). Rounds alternate the two,
so a disturbance from elsewhere hits both alike; each side's best round counts.
The events written are counted too, to show that the switch did what it says.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from bench.context import Context
from bench.drain import DrainRun, drain

# The bound: the drain with history within 15 % of the drain without.
WITHIN = 0.15


async def _drain(ctx: Context, history: bool, round_: int) -> tuple[DrainRun, int]:
    o = ctx.options
    side = "on" if history else "off"
    async with ctx.database(f"history_{side}") as url:
        if not history:
            conn = await asyncpg.connect(url)
            try:
                name = await conn.fetchval("SELECT current_database()")
                await conn.execute(f'ALTER DATABASE "{name}" SET orchestrix.history = off')
            finally:
                await conn.close()
        run = await drain(
            ctx,
            "history",
            f"history-{side}-{round_ + 1}",
            url,
            workers=o.history_workers,
            jobs=o.jobs,
        )
        conn = await asyncpg.connect(url)
        try:
            written = int(await conn.fetchval("SELECT count(*) FROM job_events"))
        finally:
            await conn.close()
    return run, written


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    runs: dict[str, list[DrainRun]] = {"on": [], "off": []}
    events: dict[str, int] = {}
    for round_ in range(o.drain_rounds):
        for history in (True, False):
            side = "on" if history else "off"
            run, written = await _drain(ctx, history, round_)
            runs[side].append(run)
            events[side] = written
            print(
                f"  history {side}, {o.history_workers} worker(s), round {round_ + 1}: "
                f"{run.jobs_per_s:,.0f} jobs/s, {written:,} events"
                + ("" if run.finished else f"  UNFINISHED: {run.succeeded}/{run.jobs}"),
                flush=True,
            )
    best = {side: max(done, key=lambda r: r.jobs_per_s) for side, done in runs.items()}
    on, off = best["on"].jobs_per_s, best["off"].jobs_per_s
    return {
        "jobs": o.jobs,
        "workers": o.history_workers,
        "rounds": o.drain_rounds,
        "on": {**best["on"].to_json(), "jobs_per_s_each_round": [r.jobs_per_s for r in runs["on"]]},
        "off": {
            **best["off"].to_json(),
            "jobs_per_s_each_round": [r.jobs_per_s for r in runs["off"]],
        },
        "events_per_job": {side: round(n / o.jobs, 2) for side, n in events.items()},
        "ratio": round(on / off, 3) if off else None,
        "within": WITHIN,
    }
