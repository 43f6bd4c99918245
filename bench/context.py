"""The sizes a run uses (full or ``--quick``) and the context every phase receives."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.infra import Databases, Servers, ServiceReport, Stack, checkpoint

# The order. The claim-cost phase writes a million rows; run after the
# latency phase, its write-back slowed that phase's commits (create->start p50
# 2.2 to 2.4 ms after it, 1.6 to 2.0 ms alone).
# The retention phases come last: they are the longest, and each writes and
# deletes a million rows or more.
PHASES = (
    "drain",
    "history",
    "sustained",
    "latency",
    "api",
    "priority",
    "fairness",
    "keys",
    "rates",
    "bulk",
    "subscribers",
    "workflows",
    "claim",
    "ceiling",
    "stats",
    "prune",
    "retention",
)


@dataclass(frozen=True)
class Options:
    """Every size and duration of a run; ``full()`` and ``quick()`` are the two presets."""

    quick: bool
    jobs: int
    drain_workers: tuple[int, ...] = (1, 2, 4)
    drain_rounds: int = 2
    history_workers: int = 2  # the drain with and without history (bench/history.py)
    worker_concurrency: int | None = None  # None: the engine's default (WORKER_CONCURRENCY)
    finished_rows: int = 1_000_000
    claim_rounds: int = 2
    latency_rate: float = 100.0
    latency_duration_s: float = 10.0
    api_clients: int = 50
    # Rounds of each of the API with authentication off and on (bench/api.py).
    api_rounds: int = 2
    api_duration_s: float = 10.0
    api_warmup_s: float = 1.0
    # The API's CPU per job at a fixed load, auth off and on (bench/api.py): single
    # creates per second, batch requests per second, seconds of each round.
    api_fixed_rate: float = 1000.0
    api_fixed_batches: float = 5.0
    api_fixed_s: float = 6.0
    api_fixed_rounds: int = 3
    bulk_clients: int = 4
    bulk_size: int = 1000
    sustained_workers: int = 2
    sustained_rates: tuple[float, ...] = (250, 500, 1000, 2000, 4000, 8000, 16000)
    sustained_step_s: float = 8.0
    sustained_refine: int = 2  # bisection steps between the last held and the first failed rate
    ceiling_jobs: int = 100_000
    ceiling_batch: int = 500
    ceiling_connections: int = 4  # per process
    insert_single: int = 20_000
    insert_single_connections: int = 10  # the API's default pool size
    insert_bulk: int = 200_000
    dispatch_backlog: int = 100_000
    priority_jobs: int = 20
    priority_gap_s: float = 0.05
    fair_rate: float = 20.0
    fair_duration_s: float = 10.0
    subscribers: int = 1000  # open event streams (bench/subscribers.py)
    subscribers_idle_s: float = 10.0
    subscribers_events: int = 100
    keys_count: int = 100  # bench/keys.py
    keys_limit: int = 5
    rate_per_s: float = 500.0  # bench/rates.py
    rate_burst: int = 50
    rate_duration_s: float = 30.0
    bulk_action_jobs: int = 100_000  # bench/bulk.py
    bulk_drain_jobs: int = 150_000
    workflow_workers: int = 2  # bench/workflows.py
    workflow_rounds: int = 5
    stats_rows: int = 10_000_000  # bench/stats.py
    stats_calls: int = 200
    prune_rows: int = 1_000_000
    prune_jobs: int = 100_000
    prune_workers: int = 2
    prune_rounds: int = 2
    retention_rate: float = 1000.0
    retention_duration_s: float = 300.0
    retention_window_s: float = 30.0
    retention_sample_s: float = 10.0
    phase_timeout_s: float = 900.0

    @classmethod
    def full(cls, jobs: int) -> Options:
        return cls(quick=False, jobs=jobs)

    @classmethod
    def quick_preset(cls, jobs: int | None) -> Options:
        return cls(
            quick=True,
            jobs=jobs or 500,
            drain_rounds=1,
            finished_rows=10_000,
            claim_rounds=1,
            prune_rounds=1,
            latency_rate=50.0,
            latency_duration_s=1.0,
            api_clients=20,
            api_rounds=1,
            api_duration_s=1.0,
            api_warmup_s=0.2,
            api_fixed_rate=100.0,
            api_fixed_batches=5.0,
            api_fixed_s=2.0,
            api_fixed_rounds=1,
            bulk_clients=2,
            bulk_size=100,
            sustained_rates=(25, 50),
            sustained_step_s=1.0,
            sustained_refine=0,
            ceiling_jobs=2_000,
            insert_single=500,
            insert_bulk=5_000,
            dispatch_backlog=2_000,
            priority_jobs=5,
            fair_duration_s=1.0,
            subscribers=20,
            subscribers_idle_s=1.0,
            subscribers_events=10,
            workflow_rounds=1,
            keys_count=10,
            rate_per_s=100.0,
            rate_burst=10,
            rate_duration_s=3.0,
            bulk_action_jobs=2_000,
            bulk_drain_jobs=5_000,
            stats_rows=100_000,
            stats_calls=50,
            prune_rows=10_000,
            prune_jobs=1_000,
            retention_rate=100.0,
            retention_duration_s=6.0,
            retention_window_s=2.0,
            retention_sample_s=1.0,
            phase_timeout_s=120.0,
        )


@dataclass
class Context:
    options: Options
    servers: Servers
    databases: Databases
    workdir: Path
    # (phase, report) for every service process the run started.
    service_reports: list[tuple[str, ServiceReport]] = field(default_factory=list)

    def service_env(self) -> dict[str, str]:
        if self.options.worker_concurrency is None:
            return {}
        return {"WORKER_CONCURRENCY": str(self.options.worker_concurrency)}

    @contextlib.asynccontextmanager
    async def database(self, label: str) -> AsyncIterator[str]:
        """A fresh migrated database for one phase, checkpointed, dropped afterwards."""
        url = await self.databases.fresh(label)
        try:
            await checkpoint(url)
            yield url
        finally:
            await self.databases.drop(url)

    @contextlib.asynccontextmanager
    async def stack(self, phase: str, label: str, db_url: str) -> AsyncIterator[Stack]:
        """Service processes for one measurement; stopped (and their use recorded) afterwards."""
        stack = Stack(self.servers, db_url, self.workdir, label, self.service_env())
        try:
            yield stack
        finally:
            for report in await stack.stop():
                self.service_reports.append((phase, report))
