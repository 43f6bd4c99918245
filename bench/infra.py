"""What every phase stands on: servers, fresh databases, service processes, CPU and memory.

- :class:`Servers`: PostgreSQL and NATS, either given as URLs or started from the
  embedded wheels in the run's temporary folder.
- :class:`Databases`: one migrated template per run; each phase gets a fresh
  copy of it (``CREATE DATABASE ... TEMPLATE``), dropped when the phase ends.
- :class:`Stack`: the real services (``python -m orchestrix.cli <role>``) of one
  phase, with their own NATS stream, subject prefix and consumer, like the
  end-to-end tests' ``System``. Stopping a stack records each process's peak RSS
  and CPU time and deletes its stream.
- :func:`sampling`: a query's rows, read every few milliseconds while a phase
  measures (what PostgreSQL's sessions are doing, say).

Every child process gets SIGTERM if the benchmark dies (``PR_SET_PDEATHSIG``),
and :func:`kill_leftovers` ends whatever is still running at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import psutil
from orchestrix import migrate
from orchestrix.devstack import database_url
from orchestrix.settings import nats_servers

REPO = Path(__file__).resolve().parents[1]
RUN_TAG = f"{os.getpid()}_{secrets.token_hex(3)}"
MIB = 1024 * 1024
_PR_SET_PDEATHSIG = 1
# Every service process still running; kill_leftovers() ends them.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


class BenchError(RuntimeError):
    """A phase could not run (a service died, a wait timed out)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark process dies, so nothing outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def kill_leftovers() -> None:
    """Stop every service process still running: SIGTERM, then SIGKILL after 5 s."""
    for process in list(_LIVE.values()):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    deadline = time.monotonic() + 5.0
    for pid, process in list(_LIVE.items()):
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        _LIVE.pop(pid, None)


# --- servers -----------------------------------------------------------------


@dataclass
class Servers:
    """The PostgreSQL server (a URL on which we may CREATE DATABASE) and NATS."""

    admin_url: str
    nats_url: str
    embedded: list[Any] = field(default_factory=list)
    # The server processes, when they run on this machine: for CPU accounting.
    pids: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def start(cls, database_url: str | None, nats_url: str | None, workdir: Path) -> Servers:
        """Use the given URLs; start an embedded server for each one not given."""
        servers = cls(admin_url=database_url or "", nats_url=nats_url or "")
        try:
            if not database_url or not nats_url:
                from orchestrix.devservers import EmbeddedNats, EmbeddedPostgres

                if not database_url:
                    postgres = EmbeddedPostgres(workdir / "postgres")
                    servers.embedded.append(postgres)
                    postgres.start(timeout_s=60.0)
                    # Once more: on a cluster fresh from initdb, drains on a table that
                    # had just grown by a million rows ran ~45% slower (PostgreSQL
                    # spent 2.5x the CPU per job) than after a restart, which is the
                    # state of any server that has been up a while.
                    postgres.stop()
                    servers.admin_url = postgres.start(timeout_s=60.0)
                if not nats_url:
                    server = EmbeddedNats(workdir / "nats")
                    servers.embedded.append(server)
                    servers.nats_url = server.start(timeout_s=30.0)
        except BaseException:
            servers.stop()
            raise
        servers.pids = {
            "postgres": _local_server_pid(servers.admin_url),
            # With a cluster given, the CPU of the first node only.
            "nats-server": _local_server_pid(nats_servers(servers.nats_url)[0]),
        }
        return servers

    def stop(self) -> None:
        for server in reversed(self.embedded):
            with contextlib.suppress(Exception):
                server.stop()
        self.embedded.clear()


def _local_server_pid(url: str) -> int | None:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return None
    return listening_pid(parts.port)


class Databases:
    """Fresh, migrated databases on the server: one template, copied for each phase."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._template: str | None = None
        self._made: list[str] = []

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def fresh(self, label: str) -> str:
        """A new database holding the newest schema and no jobs; its URL."""
        if self._template is None:
            name = f"bench_{RUN_TAG}_template"
            await self._admin(f'CREATE DATABASE "{name}"')
            self._made.append(name)
            await asyncio.to_thread(migrate.up, database_url(self.admin_url, name))
            self._template = name
        name = f"bench_{RUN_TAG}_{label}_{secrets.token_hex(2)}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        self._made.append(name)
        return database_url(self.admin_url, name)

    async def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        with contextlib.suppress(Exception):
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._made:
            self._made.remove(name)

    async def drop_all(self) -> None:
        for name in reversed(self._made):
            with contextlib.suppress(Exception):
                await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._made.clear()


async def checkpoint(url: str) -> None:
    """Flush dirty buffers before a measurement, so a checkpoint is less likely inside it.

    Needs a superuser (or pg_checkpoint); without one this does nothing.
    """
    conn = await asyncpg.connect(url)
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


# --- memory and CPU ----------------------------------------------------------


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) so far; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        rss: int = psutil.Process(pid).memory_info().rss
        return rss
    except psutil.Error:
        return None


def _process_cpu(process: psutil.Process, *, with_children: bool) -> float:
    times = process.cpu_times()
    total = float(times.user + times.system)
    if with_children:
        total += float(
            getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
        )
    return total


class CpuMeter:
    """CPU seconds used between two points, split into the benchmark's own groups.

    Groups: each service role (by pid); ``postgres`` (the postmaster and its
    backends, including the backends that exited meanwhile) and ``nats-server``,
    when they run on this machine; ``bench`` (this process and helper processes
    it started); ``kernel`` (kernel threads: softirq, I/O completion, often
    working for the groups above); ``machine`` (all CPUs, busy time); and
    ``other``: the machine's busy time nobody above accounts for, i.e. other
    programs on the machine and interrupts. Divided by ``wall``, a group's
    seconds are the cores it kept busy.
    """

    def __init__(self, roles: Mapping[int, str], servers: Mapping[str, int | None]) -> None:
        self._roles = dict(roles)
        self._servers = {name: pid for name, pid in servers.items() if pid is not None}
        self._start = self._sample()
        self._started_at = time.monotonic()

    def _sample(self) -> dict[tuple[str, int], float]:
        sample: dict[tuple[str, int], float] = {}
        for pid, role in self._roles.items():
            with contextlib.suppress(psutil.Error):
                sample[(role, pid)] = _process_cpu(psutil.Process(pid), with_children=False)
        server_pids: set[int] = set()
        for name, pid in self._servers.items():
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(pid)
                # The postmaster's children_* hold the CPU of backends that have exited.
                sample[(name, pid)] = _process_cpu(server, with_children=True)
                server_pids.add(pid)
                for child in server.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        sample[(name, child.pid)] = _process_cpu(child, with_children=False)
                        server_pids.add(child.pid)
        me = psutil.Process()
        # With its reaped children: helper processes (the ceiling's) that exited meanwhile.
        sample[("bench", me.pid)] = _process_cpu(me, with_children=True)
        for child in me.children(recursive=True):
            if child.pid not in self._roles and child.pid not in server_pids:
                with contextlib.suppress(psutil.Error):
                    sample[("bench", child.pid)] = _process_cpu(child, with_children=False)
        for process in psutil.process_iter(["ppid"]):
            # Kernel threads (children of kthreadd): softirq, I/O completion and
            # the like, often on behalf of the processes above.
            if process.info["ppid"] == 2:
                with contextlib.suppress(psutil.Error):
                    sample[("kernel", process.pid)] = _process_cpu(process, with_children=False)
        machine = psutil.cpu_times()
        sample[("machine", 0)] = float(machine.user + machine.system) + sum(
            float(getattr(machine, name, 0.0)) for name in ("nice", "irq", "softirq", "steal")
        )
        return sample

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per group since the meter started, plus ``wall``."""
        end = self._sample()
        groups: dict[str, float] = {}
        for key, value in end.items():
            used = value - self._start.get(key, 0.0)
            groups[key[0]] = groups.get(key[0], 0.0) + max(used, 0.0)
        accounted = sum(value for name, value in groups.items() if name != "machine")
        groups["other"] = max(groups.get("machine", 0.0) - accounted, 0.0)
        groups["wall"] = time.monotonic() - self._started_at
        return {name: round(value, 3) for name, value in sorted(groups.items())}


def listening_pid(port: int) -> int | None:
    """The local process listening on ``port`` of 127.0.0.1, when we may see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                pid: int | None = conn.pid
                return pid
    return None


# --- service processes -------------------------------------------------------


@dataclass
class Service:
    role: str
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


@dataclass(frozen=True)
class ServiceReport:
    """What a service process used during its life: peak RSS and CPU seconds."""

    role: str
    name: str
    peak_rss_mib: float | None
    cpu_s: float | None


class Stack:
    """The service processes of one phase, sharing one database and one set of NATS names."""

    def __init__(
        self, servers: Servers, db_url: str, workdir: Path, label: str, env: Mapping[str, str]
    ) -> None:
        tag = secrets.token_hex(4)
        self.label = label
        self.db_url = db_url
        self.nats_url = servers.nats_url
        self.workdir = workdir
        self.env: dict[str, str] = {
            **os.environ,
            "DATABASE_URL": db_url,
            "NATS_URL": servers.nats_url,
            "NATS_SUBJECT_PREFIX": f"orxbench.{tag}.jobs",
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "warning",
            "API_HOST": "127.0.0.1",
            "METRICS_HOST": "127.0.0.1",
            # The API phase runs a second API with it on (bench/api.py).
            "API_AUTH": "off",
            "SHUTDOWN_TIMEOUT": "5s",
            # noop and demo_job are what the benchmark runs.
            "WORKER_DEMO_EXECUTORS": "true",
            **env,
        }
        self.services: list[Service] = []
        self.reports: list[ServiceReport] = []

    def start(self, role: str, env: Mapping[str, str] | None = None) -> Service:
        """Launch ``python -m orchestrix.cli <role>`` (``env`` over the stack's own);
        wait for it with :meth:`ready`."""
        port = free_port()
        number = sum(1 for s in self.services if s.role == role) + 1
        name = f"{role}-{number}"
        env = {
            **self.env,
            **(env or {}),
            ("API_PORT" if role == "api" else "METRICS_PORT"): str(port),
        }
        log_path = self.workdir / f"{self.label}-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestrix.cli", role],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                # Own session: a Ctrl-C reaches only the benchmark, which stops them in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _LIVE[process.pid] = process
        service = Service(role, name, process, port, log_path)
        self.services.append(service)
        return service

    @property
    def api_url(self) -> str:
        api = next(s for s in self.services if s.role == "api")
        return f"http://127.0.0.1:{api.port}"

    def roles(self) -> dict[int, str]:
        return {s.pid: s.role for s in self.services}

    def check_alive(self) -> None:
        for service in self.services:
            code = service.process.poll()
            if code is not None:
                raise BenchError(
                    f"{self.label}: {service.name} exited with code {code}\n"
                    f"--- tail of {service.log_path} ---\n{service.log_tail()}"
                )

    async def ready(self, *services: Service, timeout_s: float = 60.0) -> None:
        """Wait until each service's /ready answers 200."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            for service in services:
                url = f"http://127.0.0.1:{service.port}/ready"
                while True:
                    self.check_alive()
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        timeout = aiohttp.ClientTimeout(total=2)
                        async with http.get(url, timeout=timeout) as response:
                            if response.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise BenchError(
                            f"{self.label}: {service.name} not ready after {timeout_s:g}s\n"
                            f"--- tail of {service.log_path} ---\n{service.log_tail()}"
                        )
                    await asyncio.sleep(0.05)

    async def stop(self) -> list[ServiceReport]:
        """Record peak RSS and CPU, SIGTERM everything (API, schedulers, workers), wait."""
        order = {"api": 0, "scheduler": 1, "worker": 2}
        services = sorted(self.services, key=lambda s: order.get(s.role, 3))
        for service in services:
            peak = peak_rss_bytes(service.pid) if service.process.poll() is None else None
            cpu: float | None = None
            with contextlib.suppress(psutil.Error):
                cpu = round(_process_cpu(psutil.Process(service.pid), with_children=False), 3)
            self.reports.append(
                ServiceReport(
                    service.role,
                    service.name,
                    None if peak is None else round(peak / MIB, 1),
                    cpu,
                )
            )
        for service in services:
            if service.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    service.process.terminate()
        deadline = time.monotonic() + 20.0
        for service in services:
            try:
                remaining = max(0.1, deadline - time.monotonic())
                await asyncio.to_thread(service.process.wait, remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    service.process.kill()
                service.process.wait()
            _LIVE.pop(service.pid, None)
        self.services.clear()
        return self.reports


# --- sampling ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sampling(url: str, sql: str, every_s: float) -> AsyncIterator[list[list[str]]]:
    """Run ``sql`` on a connection of its own every ``every_s`` until the block ends;
    yields the list its samples go into: each the first column of its rows."""
    samples: list[list[str]] = []

    async def sample() -> None:
        conn = await asyncpg.connect(url)
        try:
            while True:
                samples.append([row[0] for row in await conn.fetch(sql)])
                await asyncio.sleep(every_s)
        finally:
            await conn.close()

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the jobs table ----------------------------------------------------------

NON_TERMINAL = "('PENDING', 'WAITING', 'RUNNING', 'RETRYING')"


async def backlog(conn: Any) -> int:
    """Jobs not yet finished (waiting or running): a count, for a phase that reports it.
    It reads every unfinished row, so a loop that only waits for the end asks
    :func:`unfinished` instead."""
    count: int = await conn.fetchval(f"SELECT count(*) FROM jobs WHERE state IN {NON_TERMINAL}")
    return count


async def unfinished(conn: Any) -> bool:
    """Whether any job is not yet finished: it stops at the first one, so polling it
    beside a drain costs the database next to nothing. (Counting them every 0.1 s
    took 38 ms a call beside a drain of 60,000 jobs: a quarter of a core taken
    from the drain it watched.)"""
    found: bool = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN {NON_TERMINAL})"
    )
    return found


async def empty_jobs(conn: Any) -> None:
    """Delete every job with what hangs off it (events, edges) and the kept counts
    (TRUNCATE fires no row trigger, so the counts go by hand)."""
    await conn.execute("TRUNCATE jobs, job_events, job_dependencies, job_counts, job_count_deltas")


async def fresh_jobs(url: str) -> None:
    """:func:`empty_jobs` on the database at ``url``, then a checkpoint, so the
    measurement that follows meets an empty table and no checkpoint of its own."""
    conn = await asyncpg.connect(url)
    try:
        await empty_jobs(conn)
    finally:
        await conn.close()
    await checkpoint(url)


async def insert_noop_jobs(conn: Any, count: int, chunk: int = 10_000) -> None:
    """Insert ``count`` PENDING ``noop`` jobs with unnest, ``chunk`` rows a statement."""
    from orchestrix import ids

    job_ids = [ids.new_id() for _ in range(count)]
    for first in range(0, count, chunk):
        part = job_ids[first : first + chunk]
        await conn.execute(
            "INSERT INTO jobs (id, type) SELECT * FROM unnest($1::text[], $2::text[])",
            part,
            ["noop"] * len(part),
        )
