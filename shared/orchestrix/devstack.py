"""``orchestrix dev``: the whole system on one machine, each service its own process.

Starts the embedded PostgreSQL and NATS servers when no URL is given, applies the
migrations, runs the services with their log lines prefixed by name, and on
Ctrl-C or SIGTERM stops them in the seed's order (API, then scheduler, then
workers), then the servers. Nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from orchestrix import migrate
from orchestrix.settings import Settings, redact

DEV_DATABASE = "orchestrix"
# What `orchestrix dev` sets unless the environment says otherwise.
DEV_DEFAULTS = {"API_AUTH": "off", "API_HOST": "127.0.0.1", "METRICS_HOST": "127.0.0.1"}
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Service:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    status_port: int | None = None


def database_url(server_url: str, name: str) -> str:
    """The same server's URL with another database name."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def ensure_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _shown(host: str) -> str:
    """A listening address as a URL a browser on this machine can open."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child, before exec: get ``signum`` when the parent dies, so no service
    outlives the process that started it (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def services(settings: Settings, env: Mapping[str, str]) -> list[Service]:
    """The API, then the schedulers, then the workers: the order they are stopped in.

    Schedulers and workers get status ports counting up from METRICS_PORT.
    """
    command = (sys.executable, "-m", "orchestrix.cli")
    plan = [Service("api", (*command, "api"), env)]
    port = settings.metrics.port
    for role, count in (("scheduler", settings.dev.schedulers), ("worker", settings.dev.workers)):
        for number in range(1, count + 1):
            name = role if count == 1 else f"{role}-{number}"
            plan.append(Service(name, (*command, role), {**env, "METRICS_PORT": str(port)}, port))
            port += 1
    return plan


async def _pump(name: str, stream: asyncio.StreamReader, width: int) -> None:
    prefix = f"{name:<{width}} | ".encode()
    while line := await stream.readline():
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


async def supervise(plan: list[Service], banner: str, shutdown_timeout_s: float) -> int:
    """Run every service until a signal or one of them exits; then stop them in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    width = max(len(service.name) for service in plan)
    running: list[tuple[Service, asyncio.subprocess.Process]] = []
    pumps: list[asyncio.Task[None]] = []
    for service in plan:
        process = await asyncio.create_subprocess_exec(
            *service.argv,
            env=dict(service.env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Their own session: Ctrl-C reaches only us, and we stop them in order.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        assert process.stdout is not None
        pumps.append(asyncio.create_task(_pump(service.name, process.stdout, width)))
        running.append((service, process))
    print(banner, flush=True)

    exited = [asyncio.create_task(process.wait()) for _, process in running]
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *exited], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for (service, process), task in zip(running, exited, strict=True):
        if task.done() and not stop.is_set():
            print(f"{service.name} exited with code {process.returncode}; stopping", flush=True)
            code = 1
    for service, process in running:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), shutdown_timeout_s + 5)
            except TimeoutError:
                print(f"{service.name} did not stop in time; killing it", flush=True)
                process.kill()
                await process.wait()
    stopper.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    return code


@contextlib.contextmanager
def embedded_servers(data_dir: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start PostgreSQL / NATS for whichever of DATABASE_URL / NATS_URL is unset."""
    from orchestrix.devservers import EmbeddedNats, EmbeddedPostgres

    started: list[EmbeddedPostgres | EmbeddedNats] = []
    try:
        if not env.get("DATABASE_URL"):
            postgres = EmbeddedPostgres(data_dir / "postgres")
            started.append(postgres)
            server_url = postgres.start()
            asyncio.run(ensure_database(server_url, DEV_DATABASE))
            env["DATABASE_URL"] = database_url(server_url, DEV_DATABASE)
        if not env.get("NATS_URL"):
            nats = EmbeddedNats(data_dir / "nats")
            started.append(nats)
            env["NATS_URL"] = nats.start()
        yield env
    finally:
        for server in reversed(started):
            server.stop()


def run(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("LOG_FORMAT", "text")
    # demo_job and noop, for the README's examples; off by default everywhere else.
    env.setdefault("WORKER_DEMO_EXECUTORS", "true")
    # For development: no API keys, and so nothing listens beyond this machine
    # (an API with auth off refuses another address unless told otherwise).
    for name, value in DEV_DEFAULTS.items():
        if not env.get(name):
            env[name] = value
    dev_settings = Settings.from_env(env)
    dev_settings.auth.check_listener(dev_settings.api.host)
    with embedded_servers(data_dir, env):
        migrate.up(env["DATABASE_URL"])
        api = f"http://{_shown(dev_settings.api.host)}:{settings.api.port}"
        status_host = _shown(dev_settings.metrics.host)
        plan = services(settings, env)
        width = max(len(service.name) for service in plan) + 2
        ports = [
            f"  {service.name + ':':<{width}}http://{status_host}:{service.status_port}/metrics"
            for service in plan
            if service.status_port is not None
        ]
        auth = (
            "API keys required (API_AUTH=on)"
            if dev_settings.auth.enabled
            else "no API keys needed (API_AUTH=off)"
        )
        hosts = {dev_settings.api.host, dev_settings.metrics.host}
        where = (
            f"listening on {dev_settings.api.host} only"
            if hosts == {"127.0.0.1"}
            else f"API on {dev_settings.api.host}, status ports on {dev_settings.metrics.host}"
        )
        banner = "\n".join(
            (
                "",
                f"Orchestrix is running. API: {api}  (try: curl {api}/health)",
                f"  {auth}; {where}",
                *ports,
                f"  PostgreSQL: {redact(env['DATABASE_URL'])}",
                f"  NATS:       {redact(env['NATS_URL'])}",
                f"  data:       {data_dir}",
                "Ctrl-C stops everything.",
                "",
            )
        )
        # Each service drains within its own timeout; wait for the longer one.
        drain_s = max(settings.api.shutdown_timeout_s, settings.worker.shutdown_timeout_s)
        return asyncio.run(supervise(plan, banner, shutdown_timeout_s=drain_s))
