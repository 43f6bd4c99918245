"""Chaos runs: jobs keep flowing while workers and schedulers are SIGKILLed, workers are
SIGTERMed, cut off from PostgreSQL or slowed, and the servers restart; afterwards
every job has ended as planned, none was lost, no two executions of a job ran
at the same time, no shutdown cost an attempt, every cancellation was honoured
and every retry was counted right (``tests/chaos/records.py``).

The short run is part of ``make test``; ``make chaos`` adds the long one. Set
``CHAOS_SEED`` to replay a run's schedule of faults and jobs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.chaos.driver import ChaosRun, Plan, describe_plan
from tests.chaos.servers import ChaosServers

# The short run is part of `make test`: every kind of job, and the faults whose
# outcome is certain, within about a minute. PostgreSQL stopped during a
# worker's shutdown, a slowness beyond what the heartbeat tolerates and whole
# NATS cluster restarts are left to the long run.
SHORT = Plan(
    name="short",
    jobs=600,
    api_share=0.3,
    sync_share=0.4,
    retry_share=0.15,
    timeout_share=0.03,
    cancel_share=0.03,
    long_share=0.06,
    submit_s=15,
    chaos_s=20,
    max_sleep_ms=800,
    schedulers=2,
    workers=3,
    worker_concurrency=16,
    worker_kill_gap_s=(3.0, 5.0),
    worker_term_gap_s=(4.0, 7.0),
    scheduler_kills=("leader",),
    nats_restarts=(),
    nats_node_kills=1,
    postgres_restarts=("fast",),
    outage_s=(0.5, 1.5),
    shutdown_outages=0,
    shutdown_outage_s=(3.0, 5.0),
    cuts=1,
    cut_s=(3.5, 4.5),
    latencies_ms=(15,),
    latency_s=(2.5, 3.5),
    settle_timeout_s=45,
    workflows=12,
    keyed_share=0.1,
    rated_share=0.1,
)

LONG = Plan(
    name="long",
    jobs=3000,
    api_share=0.3,
    sync_share=0.4,
    retry_share=0.15,
    timeout_share=0.03,
    cancel_share=0.03,
    long_share=0.06,
    submit_s=85,
    chaos_s=100,
    max_sleep_ms=1000,
    schedulers=2,
    workers=4,
    worker_concurrency=16,
    worker_kill_gap_s=(3.0, 6.0),
    worker_term_gap_s=(4.0, 8.0),
    scheduler_kills=("leader", "follower"),
    nats_restarts=("SIGTERM", "SIGKILL"),
    nats_node_kills=2,
    postgres_restarts=("fast", "immediate"),
    outage_s=(0.5, 3.0),
    shutdown_outages=2,
    shutdown_outage_s=(3.0, 5.0),
    cuts=2,
    cut_s=(3.5, 6.0),
    latencies_ms=(15, 150),
    latency_s=(3.0, 6.0),
    settle_timeout_s=90,
    workflows=60,
    keyed_share=0.1,
    rated_share=0.1,
    rate_per_s=50.0,
    rate_burst=10,
)


def _seed() -> int:
    """``CHAOS_SEED`` to replay a run, else a new random seed (printed with the report)."""
    given = os.environ.get("CHAOS_SEED")
    return int(given) if given else secrets.randbelow(1_000_000)


async def _run(plan: Plan, servers: ChaosServers, workdir: Path) -> None:
    """Run ``plan``, print its report (also kept in ``report.txt``), fail on any problem."""
    seed = _seed()
    print(f"\n{describe_plan(plan, seed)}", flush=True)
    run = ChaosRun(plan, servers, workdir, seed)
    try:
        await run.run()
    finally:
        await run.stop_services()
    report, problems = run.report()
    (workdir / "report.txt").write_text(report + "\n")
    print(report, flush=True)
    assert not problems, f"chaos run {plan.name!r} seed {seed}:\n" + "\n\n".join(problems)


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_short_chaos_run_loses_and_duplicates_nothing(
    chaos_servers: ChaosServers, tmp_path: Path
) -> None:
    await _run(SHORT, chaos_servers, tmp_path)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_long_chaos_run_loses_and_duplicates_nothing(
    chaos_servers: ChaosServers, tmp_path: Path
) -> None:
    await _run(LONG, chaos_servers, tmp_path)
