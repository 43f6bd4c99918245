"""The benchmark runs: ``python -m bench --quick`` against this session's servers.

It proves every phase works and reports a figure; it asserts no timing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import Servers

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(330)

# Figures every quick run must report, as numbers above zero.
HEADLINES = (
    "drain_1w_jobs_per_s",
    "drain_2w_jobs_per_s",
    "drain_4w_jobs_per_s",
    "sustained_held_rate",
    "sustained_held_offered_rate",
    "latency_start_p50_ms",
    "latency_start_p95_ms",
    "latency_start_p99_ms",
    "latency_finish_p50_ms",
    "latency_finish_p95_ms",
    "latency_finish_p99_ms",
    "api_single_jobs_per_s",
    "priority_start_p99_ms",
    "fairness_start_p99_ms",
    "fairness_bulk_jobs_per_s",
    "claim_empty_drain_jobs_per_s",
    "claim_full_drain_jobs_per_s",
    "claim_empty_ms",
    "claim_full_ms",
    "rss_api_mib",
    "rss_scheduler_mib",
    "rss_worker_mib",
    "ceiling_1p_jobs_per_s",
    "ceiling_2p_jobs_per_s",
    "insert_single_rows_per_s",
    "insert_unnest_rows_per_s",
    "insert_copy_rows_per_s",
    "prune_off_drain_jobs_per_s",
    "prune_on_drain_jobs_per_s",
    "prune_rows_per_s",
    "retention_total_mib_at_end",
    "retention_bytes_per_job_at_end",
    "rate_starts_per_s",
    "bulk_retry_s",
    "bulk_cancel_s",
)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


async def test_quick_benchmark_reports_every_section(servers: Servers, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--json",
            str(out),
            "--database-url",
            servers.admin_url,
            "--nats-url",
            servers.nats_url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    results = json.loads(out.read_text())

    sections = ("meta", "summary", "drain", "sustained", "latency", "api", "priority", "fairness")
    for section in (*sections, "claim", "rss", "prune", "retention"):
        assert section in results, section
        assert "error" not in results[section], results[section]
    assert "ceiling" in results
    assert "error" not in results["ceiling"], results["ceiling"]

    summary = results["summary"]
    bad = {name: summary.get(name) for name in HEADLINES if not _positive(summary.get(name))}
    assert not bad, f"missing or not > 0: {bad}"
    # The bulk endpoint may not exist yet: then it is reported as n/a, not as a number.
    bulk = results["api"]["bulk"]
    if bulk["available"]:
        assert _positive(bulk["jobs_per_s"])
    else:
        assert bulk["jobs_per_s"] is None

    # The auth path is timed in-process, beside the API's own CPU per create.
    auth_path = results["api"]["auth_path"]
    assert _positive(auth_path["cpu_us"])
    assert _positive(auth_path["api_cpu_us_per_create"])
    # And the API's CPU per job at a fixed load, with auth off and on.
    for kind in ("single", "bulk"):
        fixed = results["api"]["fixed_rate"][kind]
        assert _positive(fixed["cpu_us_off"]), fixed
        assert _positive(fixed["cpu_us_on"]), fixed

    assert [run["workers"] for run in results["drain"]["runs"]] == [1, 2, 4]
    assert all(run["finished"] for run in results["drain"]["runs"])
    machine = results["meta"]["machine"]
    assert _positive(machine["cpu_count"])
    assert machine["postgresql"]
    assert machine["nats_server"]
    assert "Orchestrix benchmark" in done.stdout

    # Every database the run created was dropped again.
    conn = await asyncpg.connect(servers.admin_url)
    try:
        left = await conn.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
            f"bench_{results['meta']['run_tag']}_",
        )
    finally:
        await conn.close()
    assert not left
