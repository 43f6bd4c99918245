"""``python -m bench``: run the benchmark phases, print the table, write the JSON.

Without ``--database-url`` / ``--nats-url`` the benchmark starts PostgreSQL and
NATS from the embedded wheels in a temporary folder. Every phase gets a fresh
database and fresh NATS names; every process and server it starts is stopped
at the end, also on Ctrl-C, SIGTERM or a failed phase. A failed phase is
reported and the run goes on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench import (
    api,
    bulk,
    ceiling,
    claim,
    dispatch,
    drain,
    history,
    keys,
    latency,
    prune,
    rates,
    report,
    retention,
    stats,
    subscribers,
    sustained,
    workflows,
)
from bench.context import PHASES, Context, Options
from bench.infra import REPO, RUN_TAG, BenchError, Databases, Servers, kill_leftovers

RUNNERS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "drain": drain.run_phase,
    "history": history.run_phase,
    "claim": claim.run_phase,
    "latency": latency.run_phase,
    "api": api.run_phase,
    "priority": dispatch.run_priority,
    "fairness": dispatch.run_fairness,
    "keys": keys.run_phase,
    "rates": rates.run_phase,
    "bulk": bulk.run_phase,
    "subscribers": subscribers.run_phase,
    "workflows": workflows.run_phase,
    "sustained": sustained.run_phase,
    "ceiling": ceiling.run_phase,
    "stats": stats.run_phase,
    "prune": prune.run_phase,
    "retention": retention.run_phase,
}
DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers like 1,2,4")
    return values


def _phases(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [p for p in chosen if p not in PHASES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown phase(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PHASES)}"
        )
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark Orchestrix end to end with real servers and service processes: "
            "drain, sustained rate, latency, API, claim cost, peak RSS, the raw "
            "PostgreSQL ceiling, and pruning finished jobs. Prints a table and writes JSON."
        ),
        epilog="phases: " + ", ".join(PHASES) + " (in that order)",
    )
    parser.add_argument("--jobs", type=int, metavar="N", help="jobs per drain (default 20000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and 1 s phases, to prove the benchmark works (500 jobs, 10k rows)",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help="where to write the JSON"
    )
    parser.add_argument(
        "--only", type=_phases, metavar="PHASES", help="comma-separated phases to run"
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL server URL on which the benchmark may CREATE DATABASE "
        "(default: start an embedded server)",
    )
    parser.add_argument(
        "--nats-url",
        metavar="URL",
        help="NATS with JetStream, several comma-separated URLs for a cluster "
        "(default: start an embedded one)",
    )
    parser.add_argument(
        "--workers", type=_counts, metavar="1,2,4", help="worker processes for each drain"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="R",
        help="rounds of the drain, claim-cost and prune drains, and of the API with auth "
        "off and on; the best counts (default 2, quick 1)",
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        metavar="N",
        help="WORKER_CONCURRENCY for every worker (default: the engine's default)",
    )
    parser.add_argument(
        "--finished-rows",
        type=int,
        metavar="M",
        help="finished jobs in the table for the claim-cost phase (default 1000000)",
    )
    parser.add_argument(
        "--prune-rows",
        type=int,
        metavar="M",
        help="old finished jobs the prune phase deletes beside a drain (default 1000000)",
    )
    parser.add_argument(
        "--prune-jobs",
        type=int,
        metavar="N",
        help="jobs the prune phase drains, with and without pruning (default 100000)",
    )
    parser.add_argument(
        "--stats-rows",
        type=int,
        metavar="M",
        help="jobs in the table while the stats phase calls /api/v1/stats (default 10000000)",
    )
    parser.add_argument(
        "--retention-rate",
        type=float,
        metavar="R",
        help="jobs per second the retention phase inserts (default 1000)",
    )
    parser.add_argument(
        "--retention-duration",
        type=float,
        metavar="S",
        help="seconds the retention phase runs (default 300)",
    )
    parser.add_argument(
        "--retention-window",
        type=float,
        metavar="S",
        help="RETENTION_SUCCEEDED in the retention phase, in seconds (default 30)",
    )
    parser.add_argument(
        "--note",
        metavar="TEXT",
        default="",
        help='a label stored with the results and printed above them, e.g. "before optimisation"',
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temporary folder (logs, server data)"
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    options = Options.quick_preset(args.jobs) if args.quick else Options.full(args.jobs or 20_000)
    if args.workers:
        options = replace(options, drain_workers=args.workers)
    if args.worker_concurrency:
        options = replace(options, worker_concurrency=args.worker_concurrency)
    if args.rounds:
        options = replace(
            options,
            drain_rounds=args.rounds,
            claim_rounds=args.rounds,
            prune_rounds=args.rounds,
            api_rounds=args.rounds,
        )
    if args.finished_rows is not None:
        options = replace(options, finished_rows=args.finished_rows)
    sizes = {
        "prune_rows": args.prune_rows,
        "prune_jobs": args.prune_jobs,
        "stats_rows": args.stats_rows,
        "retention_rate": args.retention_rate,
        "retention_duration_s": args.retention_duration,
        "retention_window_s": args.retention_window,
    }
    options = replace(options, **{k: v for k, v in sizes.items() if v is not None})
    # Samples through the phase: about 30, at most every 10 s.
    if args.retention_duration is not None:
        options = replace(
            options, retention_sample_s=min(10.0, max(1.0, options.retention_duration_s / 30))
        )
    return options


async def run(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    options = options_from(args)
    phases = args.only or PHASES
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="orx-bench-"))
    failed = False
    servers: Servers | None = None
    databases: Databases | None = None
    try:
        servers = Servers.start(args.database_url, args.nats_url, workdir)
        databases = Databases(servers.admin_url)
        ctx = Context(options, servers, databases, workdir)
        results: dict[str, Any] = {
            "meta": {
                "started_at": report.now_iso(),
                "command": " ".join(["python -m bench", *sys.argv[1:]]),
                "note": args.note,
                "phases": list(phases),
                "options": asdict(options),
                "engine_config": report.engine_config(ctx.service_env()),
                "machine": await report.machine_info(servers),
                "workdir": str(workdir),
                # Every database the run creates is named bench_<run_tag>_...
                "run_tag": RUN_TAG,
            }
        }
        print(report.heading(results).rsplit("; run took", 1)[0], flush=True)
        for phase in phases:
            print(f"[{phase}]", flush=True)
            started = time.monotonic()
            try:
                async with asyncio.timeout(options.phase_timeout_s):
                    results[phase] = await RUNNERS[phase](ctx)
            except (BenchError, Exception) as exc:
                failed = True
                detail = (
                    str(exc)
                    if isinstance(exc, BenchError)
                    else "".join(traceback.format_exception(exc)).strip()
                )
                if isinstance(exc, TimeoutError):
                    detail = f"timed out after {options.phase_timeout_s:g}s"
                results[phase] = {"error": detail}
                print(f"  FAILED: {detail}", file=sys.stderr, flush=True)
            results[phase]["elapsed_s"] = round(time.monotonic() - started, 1)
        results["rss"] = report.rss_section(ctx.service_reports)
        results["meta"]["elapsed_s"] = round(time.monotonic() - began, 1)
        results["summary"] = report.summary(results)
        results["meta"]["noise"] = report.noise(results)
        report.write_json(args.json, results)
        print("", flush=True)
        print(report.render(results), flush=True)
        print(f"\nJSON written to {args.json}", flush=True)
    finally:
        kill_leftovers()
        if databases is not None:
            with contextlib.suppress(Exception):
                await databases.drop_all()
        if servers is not None:
            servers.stop()
        if failed or args.keep_workdir:
            # A failed phase's service logs are there.
            print(f"logs and server data kept in {workdir}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process and server was stopped", file=sys.stderr)
        return 130
    finally:
        kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
