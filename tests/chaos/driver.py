"""One chaos run: real services on the suite's own servers, faults injected while jobs flow.

A :class:`ChaosRun` starts the API, the schedulers and the workers as processes
(with ``tests/e2e/harness.System``), submits jobs over REST and by bulk SQL at a
steady pace, and meanwhile carries out a seeded :func:`schedule` of faults.

The jobs (:func:`ChaosRun.specs`) run on the async executor or its plain-function
twin (``tests/chaos/executors.py``); most just work a while, some outlast a
stopping worker's SHUTDOWN_TIMEOUT (so a SIGTERM hands them back), some fail a
planned number of times before they succeed, some outlive their timeout on
every attempt, and some are cancelled over REST (DELETE) while they run.

The faults: SIGKILL a worker, SIGTERM a worker (it hands its unfinished jobs
back), SIGKILL a scheduler, restart the whole NATS cluster, SIGKILL one NATS
node and start it again, restart PostgreSQL, stop PostgreSQL while a worker is
shutting down, cut one worker off from PostgreSQL, make PostgreSQL answer
slowly. Every worker reaches PostgreSQL through a proxy of its own
(``tests/faults/proxy.py``), which the run cuts or slows. Worker faults come at
any time; the others each get a slot of their own, so two of them never
overlap. A watchdog notices any process that exits without being told to,
records its last log lines and starts a replacement, so one crash does not hide
every other finding.

When the faults are over it waits for every job to reach a terminal state (the
*settle*), checks that every surviving process reports ready again, and judges
the executions file against the final rows and the faults
(``tests/chaos/records.py``). :meth:`ChaosRun.report` returns the printed table,
and the list of problems the test asserts is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson
import psutil
from orchestrix import ids
from orchestrix.db.pool import TRANSIENT, init_connection
from orchestrix.models import DEFAULT_TIMEOUT_SECONDS

from tests.chaos import records
from tests.chaos.executors import JOB_TYPE, RECORDS_ENV, SYNC_JOB_TYPE
from tests.chaos.servers import ChaosServers
from tests.e2e.harness import Service, System
from tests.faults.proxy import Proxy

T = TypeVar("T")

# The recovery settings the services read: a stuck worker's lease runs out after
# 2 s (a killed one is found by the lifeline within seconds), and the scheduler's
# leader looks for expired leases every 0.5 s.
CHAOS_ENV = {
    "LEASE_TIMEOUT": "2s",
    "MAINTENANCE_INTERVAL": "500ms",
    "SHUTDOWN_TIMEOUT": "2s",
    "RETRY_BASE_DELAY": "100ms",
    "RETRY_MAX_DELAY": "1s",
    "DB_POOL_MAX_SIZE": "8",
    "ORCHESTRIX_EXECUTORS": "tests.chaos.executors",
}
SHUTDOWN_TIMEOUT_S = 2.0  # as CHAOS_ENV says
MAX_ATTEMPTS = 10
# A timeout job works longer than its timeout on each of its attempts, then FAILS.
TIMEOUT_S = 1
TIMEOUT_ATTEMPTS = 3
TIMEOUT_OVERRUN_MS = 2000
# A cancel job works this long: only a cancellation ends it in time.
CANCEL_JOB_MS = 30_000
# A long job outlasts a stopping worker's SHUTDOWN_TIMEOUT: it is handed back.
LONG_JOB_MS = (2500, 4500)
# After PostgreSQL is back or fast again, the workers' heartbeats reconnect and
# renew within this long.
TROUBLE_AFTER_S = 2.0
# Workers younger than this are spared SIGTERMs and cuts: they have no jobs yet
# (and one SIGTERMed before it set up its handlers dies of the signal).
VICTIM_MIN_AGE_S = 2.0
# One-way latency at or above which a worker's heartbeat statements (each given
# a sixth of LEASE_TIMEOUT, 333 ms, for up to two round trips, a reconnection
# more) may time out on a busy machine: such a slow PostgreSQL is as good as
# away for it, and the judgement says so. (40 ms did lose leases here.)
AWAY_LATENCY_MS = 30
# A SIGTERMed worker exits within its SHUTDOWN_TIMEOUT, the patience of the
# writes of its hand-backs (10 s) and its goodbyes; past this it is stuck.
TERM_EXIT_S = 25.0
# Database errors that mean "the server is away" (or the connection broke mid-operation):
# the suite's own queries, all safe to repeat, wait them out.
DB_AWAY = TRANSIENT
STUCK_SHOWN = 40
# Processes that exit on their own are replaced this many times, then no more: a
# service that cannot start at all must not turn the run into a crash loop.
MAX_REPLACEMENTS = 5
# Faults that each get a slot of their own (the rest are worker faults).
# The rate limit the plan's rated jobs name.
RATE_LIMIT = "chaos-rate"
BIG_FAULTS = ("kill_scheduler", "nats", "nats_node", "postgres", "shutdown_outage", "cut", "slow")


@dataclass(frozen=True)
class Plan:
    """What a chaos run does. Times are seconds from the start of the chaos window."""

    name: str
    jobs: int
    api_share: float  # the fraction of jobs created over REST; the rest by bulk SQL
    sync_share: float  # the fraction run by the plain-function executor
    retry_share: float  # jobs that fail 1 to 3 times, then succeed
    timeout_share: float  # jobs that outlive their timeout on every attempt
    cancel_share: float  # jobs cancelled over REST while they run
    long_share: float  # jobs that work longer than SHUTDOWN_TIMEOUT: a SIGTERM hands them back
    submit_s: float  # submissions are spread evenly over this time
    chaos_s: float  # faults happen within this window
    max_sleep_ms: int  # each plain or retry job works a random 0..max_sleep_ms
    schedulers: int
    workers: int
    worker_concurrency: int
    worker_kill_gap_s: tuple[float, float]  # time between two worker SIGKILLs
    worker_term_gap_s: tuple[float, float]  # time between two worker SIGTERMs
    scheduler_kills: tuple[str, ...]  # "leader" (the one running maintenance) or "follower"
    nats_restarts: tuple[str, ...]  # the whole cluster: "SIGTERM" or "SIGKILL", one per restart
    nats_node_kills: int  # one node SIGKILLed and started again, this many times
    postgres_restarts: tuple[str, ...]  # "fast" or "immediate", one entry per restart
    outage_s: tuple[float, float]  # how long a stopped server stays down
    shutdown_outages: int  # a worker SIGTERMed, then PostgreSQL stopped before its drain ends
    shutdown_outage_s: tuple[float, float]  # how long PostgreSQL then stays down
    cuts: int  # one worker cut off from PostgreSQL (its proxy stops forwarding)
    cut_s: tuple[float, float]
    latencies_ms: tuple[int, ...]  # every worker's PostgreSQL slowed by this much one way
    latency_s: tuple[float, float]
    settle_timeout_s: float
    # Diamond workflows (a -> b, c -> d) of plain jobs, created over REST meanwhile.
    workflows: int = 0
    # Plain, retry and long jobs of the async executor (the plain-function one
    # cannot be stopped at once: see records.LIMITS) with a concurrency key, one of
    # ``keys``, under the default queue's ``key_limit``; and others under the rate
    # limit ``RATE_LIMIT`` (``rate_per_s``, burst ``rate_burst``).
    keyed_share: float = 0.0
    keys: int = 4
    key_limit: int = 2
    rated_share: float = 0.0
    rate_per_s: float = 20.0
    rate_burst: int = 5


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: ``kind`` is kill_worker, term_worker or one of BIG_FAULTS."""

    at_s: float
    kind: str
    how: str  # the signal, shutdown mode or latency; for a scheduler, "leader" or "follower"
    pause_s: float  # how long the fault lasts, or the delay before a replacement starts


def schedule(plan: Plan, rng: random.Random) -> list[Fault]:
    """The faults of a run, in time order; the same seed gives the same schedule.

    The big faults get a slot each in random order, so two of them never
    overlap; worker kills and SIGTERMs fall anywhere in the window.
    """
    big = [("kill_scheduler", which) for which in plan.scheduler_kills]
    big += [("nats", how) for how in plan.nats_restarts]
    big += [("nats_node", "SIGKILL")] * plan.nats_node_kills
    big += [("postgres", how) for how in plan.postgres_restarts]
    big += [("shutdown_outage", "fast")] * plan.shutdown_outages
    big += [("cut", "cut")] * plan.cuts
    big += [("slow", str(ms)) for ms in plan.latencies_ms]
    rng.shuffle(big)
    lasting = {
        "nats": plan.outage_s,
        "nats_node": plan.outage_s,
        "postgres": plan.outage_s,
        "shutdown_outage": plan.shutdown_outage_s,
        "cut": plan.cut_s,
        "slow": plan.latency_s,
    }
    faults: list[Fault] = []
    first, last = 0.1 * plan.chaos_s, 0.75 * plan.chaos_s
    slot = (last - first) / max(len(big), 1)
    for i, (kind, how) in enumerate(big):
        at = first + slot * (i + rng.uniform(0.1, 0.6))
        faults.append(Fault(at, kind, how, rng.uniform(*lasting.get(kind, (0.0, 1.0)))))
    for kind, how, gap in (
        ("kill_worker", "SIGKILL", plan.worker_kill_gap_s),
        ("term_worker", "SIGTERM", plan.worker_term_gap_s),
    ):
        at = rng.uniform(*gap)
        while at < 0.9 * plan.chaos_s:
            faults.append(Fault(at, kind, how, rng.uniform(0, 0.5)))
            at += rng.uniform(*gap)
    return sorted(faults, key=lambda fault: fault.at_s)


@dataclass(frozen=True)
class JobSpec:
    """A job to submit: by REST (with an idempotency key, so retries create it once) or SQL."""

    index: int
    via_api: bool
    type: str
    payload: dict[str, Any]
    max_attempts: int
    timeout_seconds: int | None
    id: str | None  # chosen by the suite for SQL inserts; the API chooses its own
    concurrency_key: str | None = None
    rate_limit: str | None = None

    @property
    def plan(self) -> str:
        return str(self.payload["plan"])


@dataclass
class Exit:
    """A process that exited although nobody stopped it."""

    role: str
    pid: int
    code: int | None
    at: float
    log_tail: str


@dataclass
class Snapshot:
    """The submitted jobs' rows at the end of the settle, and rows nobody submitted."""

    rows: dict[str, records.JobRow]
    updated_at: dict[str, float]
    strangers: int


@dataclass
class ChaosRun:
    """The processes, the faults, the submitted jobs and everything observed on the way."""

    plan: Plan
    servers: ChaosServers
    workdir: Path
    seed: int
    system: System = field(init=False)
    records_path: Path = field(init=False)
    alive: list[Service] = field(default_factory=list)
    proxies: dict[int, Proxy] = field(default_factory=dict)  # worker pid -> its proxy
    kills: dict[int, float] = field(default_factory=dict)
    kill_roles: dict[int, str] = field(default_factory=dict)
    terms: dict[int, float] = field(default_factory=dict)
    exited: dict[int, float] = field(default_factory=dict)  # SIGTERMed, seen gone
    term_problems: list[str] = field(default_factory=list)
    windows: list[records.Window] = field(default_factory=list)
    faults_done: Counter[str] = field(default_factory=Counter)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    specs_by_id: dict[str, JobSpec] = field(default_factory=dict)
    via_api: int = 0
    via_sql: int = 0
    workflows: list[str] = field(default_factory=list)
    not_submitted: list[str] = field(default_factory=list)
    cancels: dict[str, records.CancelRequest] = field(default_factory=dict)
    not_cancelled: list[str] = field(default_factory=list)
    api_answers: Counter[str] = field(default_factory=Counter)
    api_errors: list[str] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)
    origin: float = 0.0
    settle_s: float | None = None
    snapshot: Snapshot | None = None
    stragglers: set[str] = field(default_factory=set)
    latency_ms: int = 0  # applied to every worker's proxy, also to workers started meanwhile
    _stopping: bool = False
    _started: dict[int, float] = field(default_factory=dict)  # pid -> time.monotonic()
    _cut_off: Service | None = None
    # Set unless PostgreSQL is away or slow for every worker (or was, TROUBLE_AFTER_S
    # ago): a plain SIGTERM waits for it.
    _pg_fine: asyncio.Event = field(default_factory=asyncio.Event)
    _troubles: int = 0
    # Workers SIGTERMed by a plain SIGTERM, not yet exited: PostgreSQL faults wait
    # for them (only shutdown_outage means to stop PostgreSQL during a shutdown).
    _draining: set[int] = field(default_factory=set)
    _none_draining: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)  # SIGTERMed exits, cancels
    _http: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.records_path = self.workdir / "executions.csv"
        self._pg_fine.set()
        self._none_draining.set()
        env = {
            **CHAOS_ENV,
            "WORKER_CONCURRENCY": str(self.plan.worker_concurrency),
            RECORDS_ENV: str(self.records_path),
        }
        self.system = System(
            self.servers.database_url, self.servers.nats_url, self.workdir, env=env
        )
        self.origin = time.time()

    # --- processes ----------------------------------------------------------

    def note(self, text: str) -> None:
        """Add a line to the run's timeline, stamped now."""
        self.timeline.append((time.time(), text))

    async def start(self, role: str) -> Service:
        """Start a process of ``role`` and count it among the living; a worker gets a
        proxy of its own in front of PostgreSQL."""
        if role != "worker":
            service = self.system.start(role)
        else:
            port = self.servers.postgres.port
            assert port is not None
            proxy = Proxy("127.0.0.1", port)
            # Its own thread and loop: forwarding never waits for the driver.
            await asyncio.to_thread(proxy.start)
            if self.latency_ms:
                proxy.latency(self.latency_ms)
            service = self.system.start(role, DATABASE_URL=proxy.url(self.servers.database_url))
            self.proxies[service.process.pid] = proxy
        self.alive.append(service)
        self._started[service.process.pid] = time.monotonic()
        return service

    @property
    def api(self) -> Service:
        """The API process running now (the watchdog may have replaced it)."""
        return next(s for s in self.alive if s.role == "api")

    async def kill(self, service: Service) -> None:
        """SIGKILL a process and remember when, for the judgement of its executions."""
        self.alive.remove(service)
        service.process.kill()
        await asyncio.to_thread(service.process.wait, 10)
        self.kills[service.process.pid] = time.time()
        self.kill_roles[service.process.pid] = service.role

    def terminate(self, service: Service, *, plain: bool = True) -> None:
        """SIGTERM a process; a task waits for it to exit (SIGKILL if it does not).
        ``plain``: PostgreSQL faults wait until it has exited."""
        if plain:
            self._draining.add(service.process.pid)
            self._none_draining.clear()
        self.alive.remove(service)
        self.terms[service.process.pid] = time.time()
        service.signal(signal.SIGTERM)
        self._tasks.append(asyncio.create_task(self._await_exit(service)))

    async def _await_exit(self, service: Service) -> None:
        try:
            await self._await_exit_of(service)
        finally:
            self._draining.discard(service.process.pid)
            if not self._draining:
                self._none_draining.set()

    async def _await_exit_of(self, service: Service) -> None:
        pid = service.process.pid
        try:
            code = await asyncio.to_thread(service.wait, TERM_EXIT_S)
        except subprocess.TimeoutExpired:
            tail = "\n".join(f"    {line}" for line in service.log().splitlines()[-15:])
            self.term_problems.append(
                f"{service.role} pid {pid} still running {TERM_EXIT_S:.0f}s after SIGTERM; "
                f"SIGKILLed. Last log lines:\n{tail}"
            )
            await self.kill_stopping(service)
            return
        self.exited[pid] = time.time()
        self.note(f"{service.role} pid {pid} exited (code {code}) after SIGTERM")
        if code != 0:
            self.term_problems.append(f"{service.role} pid {pid} exited with code {code}")

    async def kill_stopping(self, service: Service) -> None:
        """SIGKILL a process that was already told to stop."""
        service.process.kill()
        await asyncio.to_thread(service.process.wait, 10)
        self.kills[service.process.pid] = time.time()
        self.kill_roles[service.process.pid] = service.role

    async def leader(self) -> Service | None:
        """The scheduler holding the maintenance lock, found by its connection's port."""

        async def ports(conn: asyncpg.Connection) -> set[int]:
            rows = await conn.fetch(
                "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted"
            )
            return {row["client_port"] for row in rows}

        try:
            held = await self.with_db(ports, 5)
        except TimeoutError:
            return None
        for service in self.alive:
            if service.role != "scheduler":
                continue
            try:
                process = psutil.Process(service.process.pid)
                listing = getattr(process, "net_connections", None) or process.connections
                local = {c.laddr.port for c in listing(kind="tcp") if c.raddr}
            except psutil.Error:
                continue
            if local & held:
                return service
        return None

    async def watch(self) -> None:
        """Replace any process that exits on its own, and record that it did."""
        while not self._stopping:
            for service in list(self.alive):
                code = service.process.poll()
                if code is None or self._stopping:
                    continue
                self.alive.remove(service)
                self.exited[service.process.pid] = time.time()
                tail = "\n".join(service.log().splitlines()[-25:])
                self.exits.append(Exit(service.role, service.process.pid, code, time.time(), tail))
                text = f"{service.role} pid {service.process.pid} EXITED on its own (code {code})"
                if len(self.exits) <= MAX_REPLACEMENTS:
                    replacement = await self.start(service.role)
                    text += f"; started pid {replacement.process.pid}"
                else:
                    text += "; not replaced, too many exits"
                self.note(text)
            await asyncio.sleep(0.2)

    async def start_services(self) -> None:
        """The API, the schedulers and the workers, each answering /ready."""
        services = [await self.start("api")]
        services += [await self.start("scheduler") for _ in range(self.plan.schedulers)]
        services += [await self.start("worker") for _ in range(self.plan.workers)]
        await asyncio.gather(*(self.system.ready(s, 30) for s in services))

    async def stop_services(self) -> None:
        """SIGTERM every process still running, SIGKILL what has not exited 15 s later;
        then close the proxies."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [s for s in self.system.services if s.process.poll() is None]
        for service in running:
            service.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for service in running:
            try:
                await asyncio.to_thread(service.wait, max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                service.process.kill()
                await asyncio.to_thread(service.wait, 5)
        self.alive.clear()
        for proxy in self.proxies.values():
            await asyncio.to_thread(proxy.stop)
        if self._http is not None:
            await self._http.close()

    # --- faults --------------------------------------------------------------

    async def inject(self, faults: Sequence[Fault], rng: random.Random) -> None:
        """Carry out the big faults one after another, and the worker faults alongside."""
        big = [fault for fault in faults if fault.kind in BIG_FAULTS]
        small = [fault for fault in faults if fault.kind not in BIG_FAULTS]
        await asyncio.gather(self._inject(big, rng), self._inject(small, rng))

    async def _inject(self, faults: Sequence[Fault], rng: random.Random) -> None:
        """Each fault at its time, or as soon as the one before it is over."""
        for fault in faults:
            delay = self.origin + fault.at_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await getattr(self, f"_fault_{fault.kind}")(fault, rng)
            self.faults_done[fault.kind] += 1

    def _victim(self, role: str, rng: random.Random, *, settled: bool = False) -> Service | None:
        """A process of ``role`` to fault, never the worker being cut off; ``settled``:
        only one that has been up a while."""
        candidates = [s for s in self.alive if s.role == role and s is not self._cut_off]
        if settled:
            old = time.monotonic() - VICTIM_MIN_AGE_S
            candidates = [s for s in candidates if self._started[s.process.pid] <= old]
        return rng.choice(candidates) if candidates else None

    async def _fault_kill_worker(self, fault: Fault, rng: random.Random) -> None:
        victim = self._victim("worker", rng)
        if victim is None:
            self.note("no worker to SIGKILL")
            return
        await self.kill(victim)
        self.note(f"SIGKILL worker pid {victim.process.pid}")
        await asyncio.sleep(fault.pause_s)
        self.note(f"started worker pid {(await self.start('worker')).process.pid}")

    async def _fault_term_worker(self, fault: Fault, rng: random.Random) -> None:
        # A hand-back needs PostgreSQL: a plain SIGTERM comes while it is healthy,
        # and PostgreSQL faults wait until the worker has exited, so any attempt the
        # shutdown costs is a bug (the shutdown_outage fault, and the judgement's
        # known limitation, are for the other case).
        await self._pg_fine.wait()
        victim = self._victim("worker", rng, settled=True)
        if victim is None:
            self.note("no worker to SIGTERM")
            return
        self.terminate(victim)
        self.note(f"SIGTERM worker pid {victim.process.pid}")
        await asyncio.sleep(fault.pause_s)
        self.note(f"started worker pid {(await self.start('worker')).process.pid}")

    async def _fault_kill_scheduler(self, fault: Fault, rng: random.Random) -> None:
        candidates = [s for s in self.alive if s.role == "scheduler"]
        leader = await self.leader()
        what = " (leader unknown)" if leader is None else f" (a {fault.how})"
        if leader is not None:
            if fault.how == "leader":
                candidates = [leader]
            elif len(candidates) > 1:
                candidates.remove(leader)
        if not candidates:
            self.note("no scheduler to SIGKILL")
            return
        victim = rng.choice(candidates)
        await self.kill(victim)
        self.note(f"SIGKILL scheduler pid {victim.process.pid}{what}")
        await asyncio.sleep(fault.pause_s)
        self.note(f"started scheduler pid {(await self.start('scheduler')).process.pid}")

    async def _fault_nats(self, fault: Fault, rng: random.Random) -> None:
        await self.servers.stop_nats(signal.Signals[fault.how])
        self.note(f"NATS cluster stopped ({fault.how} to all three nodes)")
        await asyncio.sleep(fault.pause_s)
        await self.servers.start_nats()
        self.note("NATS cluster started and formed")

    async def _fault_nats_node(self, fault: Fault, rng: random.Random) -> None:
        index = rng.randrange(len(self.servers.nats.nodes))
        node = await self.servers.kill_nats_node(index)
        self.note(f"NATS node {index} (port {node.port}) SIGKILLed")
        await asyncio.sleep(fault.pause_s)
        await self.servers.restart_nats_node(node)
        self.note(f"NATS node {index} started and rejoined")

    def _trouble(self, on: bool) -> None:
        """PostgreSQL away or slow for every worker from now (on), or fine again (off)."""
        self._troubles += 1
        if on:
            self._pg_fine.clear()
        else:
            asyncio.get_running_loop().call_later(TROUBLE_AFTER_S, self._fine, self._troubles)

    def _fine(self, troubles: int) -> None:
        if troubles == self._troubles:  # no new trouble meanwhile
            self._pg_fine.set()

    async def _postgres_outage(self, how: str, pause_s: float) -> None:
        began = time.time()
        self._trouble(True)
        await self.servers.stop_postgres(how)
        self.note(f"PostgreSQL stopped ({how})")
        await asyncio.sleep(pause_s)
        await self.servers.start_postgres()
        self._trouble(False)
        self.windows.append(records.Window(began, time.time(), "PostgreSQL stopped"))
        self.note("PostgreSQL started")

    async def _fault_postgres(self, fault: Fault, rng: random.Random) -> None:
        await self._none_draining.wait()
        await self._postgres_outage(fault.how, fault.pause_s)

    async def _fault_shutdown_outage(self, fault: Fault, rng: random.Random) -> None:
        """SIGTERM a worker, stop PostgreSQL while it drains, start it a few seconds later."""
        await self._none_draining.wait()
        victim = self._victim("worker", rng, settled=True)
        if victim is None:
            self.note("no worker to SIGTERM before the outage")
            return
        self._trouble(True)  # no plain SIGTERM from now until PostgreSQL is back
        self.terminate(victim, plain=False)
        self.note(f"SIGTERM worker pid {victim.process.pid}, PostgreSQL to stop while it drains")
        self.note(f"started worker pid {(await self.start('worker')).process.pid}")
        await asyncio.sleep(rng.uniform(0.2, 0.6) * SHUTDOWN_TIMEOUT_S)
        await self._postgres_outage(fault.how, fault.pause_s)

    async def _fault_cut(self, fault: Fault, rng: random.Random) -> None:
        victim = self._victim("worker", rng, settled=True)
        if victim is None:
            self.note("no worker to cut off")
            return
        pid = victim.process.pid
        proxy = self.proxies[pid]
        began = time.time()
        proxy.cut()
        self._cut_off = victim
        self.note(f"worker pid {pid} cut off from PostgreSQL")
        await asyncio.sleep(fault.pause_s)
        if self.latency_ms:
            proxy.latency(self.latency_ms)  # forwarding again, still slow
        else:
            proxy.heal()
        self._cut_off = None
        self.windows.append(records.Window(began, time.time(), "cut off", pids=frozenset({pid})))
        self.note(f"worker pid {pid} reconnected to PostgreSQL")

    async def _fault_slow(self, fault: Fault, rng: random.Random) -> None:
        ms = int(fault.how)
        await self._none_draining.wait()
        began = time.time()
        self._trouble(True)
        self.latency_ms = ms
        for proxy in self.proxies.values():
            proxy.latency(ms)
        self.note(f"PostgreSQL slow for every worker: +{ms} ms each way")
        await asyncio.sleep(fault.pause_s)
        self.latency_ms = 0
        for pid, proxy in self.proxies.items():
            if self._cut_off is None or self._cut_off.process.pid != pid:
                proxy.heal()  # (a worker cut off meanwhile stays cut)
        self._trouble(False)
        away = ms >= AWAY_LATENCY_MS
        what = f"PostgreSQL slow (+{ms} ms)"
        self.windows.append(records.Window(began, time.time(), what, unreachable=away))
        self.note("PostgreSQL fast again")

    # --- jobs ---------------------------------------------------------------

    def specs(self, rng: random.Random) -> list[JobSpec]:
        """Every job of the run, drawn from the seeded ``rng``."""
        plan = self.plan
        specs = []
        for i in range(plan.jobs):
            api = rng.random() < plan.api_share
            job_type = SYNC_JOB_TYPE if rng.random() < plan.sync_share else JOB_TYPE
            draw = rng.random()
            payload: dict[str, Any] = {"sleep_ms": rng.randint(0, plan.max_sleep_ms)}
            max_attempts, timeout_seconds = MAX_ATTEMPTS, None
            if draw < plan.timeout_share:
                payload = {"plan": "timeout", "sleep_ms": TIMEOUT_S * 1000 + TIMEOUT_OVERRUN_MS}
                max_attempts, timeout_seconds = TIMEOUT_ATTEMPTS, TIMEOUT_S
            elif draw < plan.timeout_share + plan.cancel_share:
                payload = {"plan": "cancel", "sleep_ms": CANCEL_JOB_MS}
            elif draw < plan.timeout_share + plan.cancel_share + plan.retry_share:
                payload.update(plan="retry", fail_times=rng.randint(1, 3))
            elif draw < plan.timeout_share + plan.cancel_share + plan.retry_share + plan.long_share:
                payload = {"plan": "long", "sleep_ms": rng.randint(*LONG_JOB_MS)}
            else:
                payload["plan"] = "plain"
            key = rate = None
            if payload["plan"] in ("plain", "retry", "long"):
                limited = rng.random()
                if limited < plan.keyed_share:
                    key, job_type = f"key-{rng.randrange(plan.keys)}", JOB_TYPE
                elif limited < plan.keyed_share + plan.rated_share:
                    rate, job_type = RATE_LIMIT, JOB_TYPE
            specs.append(
                JobSpec(
                    index=i,
                    via_api=api,
                    type=job_type,
                    payload=payload,
                    max_attempts=max_attempts,
                    timeout_seconds=timeout_seconds,
                    id=None if api else ids.new_id(),
                    concurrency_key=key,
                    rate_limit=rate,
                )
            )
        return specs

    async def set_limits(self) -> None:
        """The default queue's key limit and the rate limit the plan's jobs name."""

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO queues (name, key_limit) VALUES ('default', $1) "
                "ON CONFLICT (name) DO UPDATE SET key_limit = excluded.key_limit",
                self.plan.key_limit,
            )
            await conn.execute(
                "INSERT INTO rate_limits (name, per_second, burst, tokens) "
                "VALUES ($1, $2, $3::int, $3::int) ON CONFLICT (name) DO NOTHING",
                RATE_LIMIT,
                self.plan.rate_per_s,
                self.plan.rate_burst,
            )

        await self.with_db(write, 30)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def submit(self, specs: Sequence[JobSpec], give_up_s: float) -> None:
        """Submit at an even pace over ``plan.submit_s``; retry through outages."""
        posts: list[asyncio.Task[None]] = []
        inserts: list[asyncio.Task[None]] = []
        gate = asyncio.Semaphore(16)
        give_up = time.monotonic() + give_up_s
        done = 0
        while done < len(specs):
            elapsed = time.time() - self.origin
            due = min(len(specs), int(len(specs) * elapsed / self.plan.submit_s) + 1)
            batch = specs[done:due]
            done = due
            sql = [spec for spec in batch if not spec.via_api]
            if sql:
                inserts.append(asyncio.create_task(self._insert(sql, give_up)))
            for spec in batch:
                if spec.via_api:
                    posts.append(asyncio.create_task(self._post(gate, spec, give_up)))
            await asyncio.sleep(0.2)
        await asyncio.gather(*posts, *inserts)

    def _submitted(self, job_id: str, spec: JobSpec, give_up: float) -> None:
        self.submitted.append(job_id)
        self.specs_by_id[job_id] = spec
        if spec.plan == "cancel":
            self._tasks.append(asyncio.create_task(self._cancel_when_running(job_id, give_up)))

    async def _insert(self, batch: Sequence[JobSpec], give_up: float) -> None:
        """Insert a batch in one statement, as a bulk loader would, through outages."""
        job_ids = [spec.id for spec in batch if spec.id is not None]

        async def insert(conn: asyncpg.Connection) -> None:
            # ON CONFLICT: a retry after a commit whose answer was lost inserts nothing.
            await conn.execute(
                "INSERT INTO jobs (id, type, payload, max_attempts, timeout_seconds, "
                "concurrency_key, rate_limit) "
                "SELECT id, type, payload::jsonb, max_attempts, COALESCE(timeout_seconds, $6), "
                "concurrency_key, rate_limit "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::int[], "
                "$7::text[], $8::text[]) "
                "AS t(id, type, payload, max_attempts, timeout_seconds, concurrency_key, "
                "rate_limit) "
                "ON CONFLICT (id) DO NOTHING",
                job_ids,
                [spec.type for spec in batch],
                [orjson.dumps(spec.payload).decode() for spec in batch],
                [spec.max_attempts for spec in batch],
                [spec.timeout_seconds for spec in batch],
                DEFAULT_TIMEOUT_SECONDS,
                [spec.concurrency_key for spec in batch],
                [spec.rate_limit for spec in batch],
            )

        try:
            await self.with_db(insert, give_up - time.monotonic())
        except TimeoutError:
            self.not_submitted += [f"SQL insert of {len(job_ids)} jobs"]
            return
        for spec in batch:
            assert spec.id is not None
            self._submitted(spec.id, spec, give_up)
        self.via_sql += len(job_ids)

    async def _post(self, gate: asyncio.Semaphore, spec: JobSpec, give_up: float) -> None:
        """Create one job over REST, retrying with the same idempotency key."""
        body: dict[str, Any] = {
            "type": spec.type,
            "payload": spec.payload,
            "max_attempts": spec.max_attempts,
            "idempotency_key": f"chaos-{self.seed}-{spec.index}",
        }
        if spec.timeout_seconds is not None:
            body["timeout_seconds"] = spec.timeout_seconds
        if spec.concurrency_key is not None:
            body["concurrency_key"] = spec.concurrency_key
        if spec.rate_limit is not None:
            body["rate_limit"] = spec.rate_limit
        delay = 0.1
        async with gate:
            while time.monotonic() < give_up:
                url = f"http://127.0.0.1:{self.api.port}/api/v1/jobs"
                try:
                    async with self.http.post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=10)
                    ) as response:
                        self.api_answers[f"POST {response.status}"] += 1
                        text = await response.text()
                        if response.status in (200, 201):
                            self._submitted(orjson.loads(text)["id"], spec, give_up)
                            self.via_api += 1
                            return
                        if response.status != 503:
                            self.api_errors.append(f"POST {response.status} {text[:300]}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.api_answers[f"POST {type(exc).__name__}"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.not_submitted.append(f"job #{spec.index} over REST")

    async def submit_workflows(self, rng: random.Random, give_up_s: float) -> None:
        """``plan.workflows`` diamonds, spread over ``plan.submit_s``."""
        count = self.plan.workflows
        give_up = time.monotonic() + give_up_s
        specs = []
        for i in range(count):
            jobs = []
            for key, parents in (("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"])):
                job_type = SYNC_JOB_TYPE if rng.random() < self.plan.sync_share else JOB_TYPE
                payload = {"plan": "plain", "sleep_ms": rng.randint(0, self.plan.max_sleep_ms)}
                jobs.append(
                    {
                        "key": key,
                        "type": job_type,
                        "payload": payload,
                        "max_attempts": MAX_ATTEMPTS,
                        "depends_on": parents,
                    }
                )
            specs.append({"name": f"chaos-{self.seed}-{i}", "jobs": jobs})
        posts = []
        for i, body in enumerate(specs):
            await asyncio.sleep(
                max(0.0, self.origin + i * self.plan.submit_s / count - time.time())
            )
            posts.append(asyncio.create_task(self._post_workflow(body, give_up)))
        await asyncio.gather(*posts)

    async def _post_workflow(self, body: dict[str, Any], give_up: float) -> None:
        """Create one workflow over REST; after an answer that was lost, look for it by
        name in the database first, so that a retry creates it once."""

        async def existing(conn: asyncpg.Connection) -> str | None:
            found: str | None = await conn.fetchval(
                "SELECT id FROM workflows WHERE name = $1", body["name"]
            )
            return found

        async def jobs_of(conn: asyncpg.Connection, *, workflow_id: str) -> list[Any]:
            return list(
                await conn.fetch(
                    "SELECT id, type, payload FROM jobs WHERE workflow_id = $1", workflow_id
                )
            )

        tried = False
        while time.monotonic() < give_up:
            workflow_id = None
            if tried:
                with contextlib.suppress(TimeoutError):
                    workflow_id = await self.with_db(existing, 10)
            if workflow_id is None:
                tried = True
                url = f"http://127.0.0.1:{self.api.port}/api/v1/workflows"
                try:
                    async with self.http.post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=10)
                    ) as response:
                        self.api_answers[f"POST workflow {response.status}"] += 1
                        text = await response.text()
                        if response.status == 201:
                            workflow_id = orjson.loads(text)["id"]
                        elif response.status != 503:
                            self.api_errors.append(f"POST workflow {response.status} {text[:300]}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.api_answers[f"POST workflow {type(exc).__name__}"] += 1
            if workflow_id is not None:
                rows = await self.with_db(functools.partial(jobs_of, workflow_id=workflow_id), 30)
                for row in rows:
                    spec = JobSpec(
                        -1, True, row["type"], dict(row["payload"]), MAX_ATTEMPTS, None, row["id"]
                    )
                    self._submitted(row["id"], spec, give_up)
                self.workflows.append(workflow_id)
                return
            await asyncio.sleep(0.3)
        self.not_submitted.append(f"workflow {body['name']}")

    async def _cancel_when_running(self, job_id: str, give_up: float) -> None:
        """Wait until the job runs, give it a moment, then DELETE it over REST.

        Retries through outages (503) and a job moving meanwhile (409 "retry"),
        and keeps the answer it settles on, with the time its DELETE was sent.
        """
        url = f"http://127.0.0.1:{{port}}/api/v1/jobs/{job_id}"
        timeout = aiohttp.ClientTimeout(total=10)
        while time.monotonic() < give_up:
            try:
                async with self.http.get(url.format(port=self.api.port), timeout=timeout) as got:
                    if got.status == 200:
                        state = orjson.loads(await got.read())["state"]
                        if state == "RUNNING" or state in records.TERMINAL:
                            break
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        await asyncio.sleep(random.uniform(0.1, 1.0))
        while time.monotonic() < give_up:
            sent = time.time()
            try:
                async with self.http.delete(
                    url.format(port=self.api.port), timeout=timeout
                ) as response:
                    text = await response.text()
                    self.api_answers[f"DELETE {response.status}"] += 1
                    final = response.status in (200, 202, 404) or (
                        response.status == 409 and "already" in text
                    )
                    if final:
                        self.cancels[job_id] = records.CancelRequest(
                            sent, time.time(), response.status
                        )
                        return
                    if response.status not in (409, 503):
                        self.api_errors.append(f"DELETE {response.status} {text[:300]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.api_answers[f"DELETE {type(exc).__name__}"] += 1
            await asyncio.sleep(0.2)
        self.not_cancelled.append(job_id)

    async def with_db(
        self, work: Callable[[asyncpg.Connection], Awaitable[T]], timeout_s: float
    ) -> T:
        """Run ``work`` on a fresh connection, retrying while PostgreSQL is away."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = await asyncpg.connect(self.servers.database_url, timeout=5)
                try:
                    await init_connection(conn)
                    return await work(conn)
                finally:
                    await conn.close(timeout=2)
            except DB_AWAY:
                if time.monotonic() > deadline:
                    raise TimeoutError("PostgreSQL stayed away") from None
                await asyncio.sleep(0.2)

    # --- the run -----------------------------------------------------------------

    async def run(self) -> None:
        """Start everything, inject the faults while submitting, settle, and judge."""
        rng = random.Random(self.seed)
        specs = self.specs(rng)
        faults = schedule(self.plan, random.Random(f"{self.seed}-faults"))
        pick = random.Random(f"{self.seed}-victims")
        await self.start_services()
        await self.set_limits()
        self.origin = time.time()
        self.note(f"chaos starts: {len(faults)} faults planned")
        watchdog = asyncio.create_task(self.watch())
        try:
            give_up_s = self.plan.submit_s + self.plan.chaos_s + 60
            await asyncio.gather(
                self.submit(specs, give_up_s),
                self.submit_workflows(rng, give_up_s),
                self.inject(faults, pick),
            )
            self.note("chaos over: every fault repaired, every job submitted")
            await self.settle()
            # The SIGTERMed workers have exited (or were killed), and every DELETE answered.
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.check_ready()
        finally:
            self._stopping = True
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    async def settle(self) -> None:
        """Wait until every submitted job is terminal, then keep the rows' final state."""
        started = time.monotonic()
        deadline = started + self.plan.settle_timeout_s
        wanted = list(self.submitted)

        async def waiting(conn: asyncpg.Connection) -> Counter[str]:
            rows = await conn.fetch(
                "SELECT state, count(*) AS n FROM jobs WHERE id = ANY($1) GROUP BY state",
                wanted,
            )
            counts = Counter({row["state"]: row["n"] for row in rows})
            counts["(missing)"] = len(wanted) - sum(counts.values())
            return Counter({s: n for s, n in counts.items() if s not in records.TERMINAL and n})

        async def few(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch(
                "SELECT id, state, attempt FROM jobs WHERE id = ANY($1) AND NOT state = ANY($2) "
                "ORDER BY id LIMIT 3",
                wanted,
                list(records.TERMINAL),
            )
            return [f"{row['id']} {row['state']} attempt {row['attempt']}" for row in rows]

        last_note = 0.0
        while True:
            left = await self.with_db(waiting, 30)
            if not left:
                self.settle_s = time.monotonic() - started
                self.note("settled: every job is terminal")
                break
            if time.monotonic() > deadline:
                self.note(f"NOT settled within {self.plan.settle_timeout_s:.0f}s")
                break
            if time.monotonic() - last_note >= 2:
                last_note = time.monotonic()
                text = "waiting for " + ", ".join(f"{s} {n}" for s, n in sorted(left.items()))
                if sum(left.values()) <= 3:
                    stragglers = await self.with_db(few, 30)
                    self.stragglers.update(line.split()[0] for line in stragglers)
                    text += ": " + "; ".join(stragglers)
                self.note(f"{text}; {await self.workers_state()}")
            await asyncio.sleep(0.25)
        self.snapshot = await self.with_db(self._snapshot, 30)

    async def _snapshot(self, conn: asyncpg.Connection) -> Snapshot:
        """Read the final rows of the submitted jobs."""
        rows = await conn.fetch(
            "SELECT id, state, attempt, max_attempts, last_error, errors, payload, "
            "timeout_seconds, handoffs, extract(epoch FROM updated_at)::float8 AS updated, "
            "extract(epoch FROM completed_at)::float8 AS completed, cancelled_by, "
            "concurrency_key, rate_limit "
            "FROM jobs WHERE id = ANY($1)",
            list(self.submitted),
        )
        total: int = await conn.fetchval("SELECT count(*) FROM jobs")
        history: dict[str, list[tuple[str | None, str, int]]] = defaultdict(list)
        claimed: dict[str, list[float]] = defaultdict(list)
        for event in await conn.fetch(
            "SELECT job_id, from_state, to_state, attempt, "
            "extract(epoch FROM at)::float8 AS at FROM job_events "
            "WHERE job_id = ANY($1) ORDER BY job_id, id",
            list(self.submitted),
        ):
            history[event["job_id"]].append(
                (event["from_state"], event["to_state"], event["attempt"])
            )
            if event["to_state"] == "RUNNING":
                claimed[event["job_id"]].append(event["at"])
        parents: dict[str, tuple[str, ...]] = {
            row["job_id"]: tuple(row["parents"])
            for row in await conn.fetch(
                "SELECT job_id, array_agg(parent_id) AS parents FROM job_dependencies "
                "WHERE job_id = ANY($1) GROUP BY job_id",
                list(self.submitted),
            )
        }
        return Snapshot(
            rows={
                row["id"]: records.JobRow(
                    id=row["id"],
                    state=row["state"],
                    attempt=row["attempt"],
                    max_attempts=row["max_attempts"],
                    last_error=row["last_error"],
                    errors=row["errors"],
                    payload=row["payload"],
                    timeout_seconds=row["timeout_seconds"],
                    handoffs=row["handoffs"],
                    history=history[row["id"]],
                    parents=parents.get(row["id"], ()),
                    cancelled_by=row["cancelled_by"],
                    completed=row["completed"],
                    concurrency_key=row["concurrency_key"],
                    rate_limit=row["rate_limit"],
                    claimed_at=tuple(claimed[row["id"]]),
                )
                for row in rows
            },
            updated_at={row["id"]: row["updated"] for row in rows},
            strangers=total - len(rows),
        )

    async def check_ready(self) -> None:
        """Every process that was never restarted must have reconnected to both servers."""
        for service in list(self.alive):
            try:
                await self.system.ready(service, 20)
            except AssertionError:
                tail = "\n".join(service.log().splitlines()[-15:])
                self.not_ready.append(
                    f"{service.role} pid {service.process.pid} not ready 20 s after the chaos; "
                    f"last log lines:\n{tail}"
                )

    # --- the verdict -------------------------------------------------------------

    @property
    def faults(self) -> records.Faults:
        """What the run did, as the judgement reads it."""
        return records.Faults(
            kills=self.kills,
            terms=self.terms,
            exits=self.exited,
            windows=self.windows,
            cancels=self.cancels,
        )

    def verdict(self) -> tuple[records.Parsed, records.Verdict]:
        """The executions file, parsed and judged against the final rows."""
        text = self.records_path.read_text() if self.records_path.exists() else ""
        parsed = records.parse(text)
        rows = self.snapshot.rows if self.snapshot else {}
        limits = records.Limits(
            key_limit=self.plan.key_limit,
            rate_per_s=self.plan.rate_per_s,
            rate_burst=self.plan.rate_burst,
        )
        return parsed, records.judge(parsed.executions, rows, self.faults, self.origin, limits)

    async def workers_state(self) -> str:
        """The workers registered now, and what each holds RUNNING."""

        async def read(conn: asyncpg.Connection) -> str:
            rows = await conn.fetch(
                "SELECT w.id, w.pid, (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id"
                " AND j.state = 'RUNNING') AS running FROM workers w ORDER BY w.id"
            )
            return "workers: " + (
                ", ".join(f"pid {r['pid']} running {r['running']}" for r in rows) or "none"
            )

        try:
            return await self.with_db(read, 5)
        except Exception as exc:
            return f"workers unknown ({exc!r})"

    def straggler_logs(self) -> list[str]:
        """Every log line about the jobs that were the last to settle: why they were slow."""
        lines = []
        for job_id in sorted(self.stragglers):
            lines.append(f"log lines about straggler {job_id}:")
            for service in self.system.services:
                lines += [
                    f"  {service.role} pid {service.process.pid}: {line}"
                    for line in service.log().splitlines()
                    if job_id in line
                ]
        return lines

    def report(self) -> tuple[str, list[str]]:
        """The printed report and the problems the test must fail on."""
        assert self.snapshot is not None
        parsed, verdict = self.verdict()
        rows = self.snapshot.rows
        faults = self.faults
        origin = self.origin
        problems: list[str] = []
        missing = sorted(set(self.submitted) - set(rows))
        stuck = sorted(
            (row for row in rows.values() if row.state not in records.TERMINAL),
            key=lambda row: (row.state, row.id),
        )
        lost = len(stuck) + len(missing)
        specs = list(self.specs_by_id.values())
        kinds = Counter(spec.plan for spec in specs)
        types = Counter("thread" if spec.type == SYNC_JOB_TYPE else "async" for spec in specs)
        by_plan: dict[str, Counter[str]] = {}
        for row in rows.values():
            by_plan.setdefault(row.plan, Counter())[row.state] += 1
        worker_kills = sum(1 for role in self.kill_roles.values() if role == "worker")
        scheduler_kills = sum(1 for role in self.kill_roles.values() if role == "scheduler")
        settle = (
            f"{self.settle_s:.1f}s"
            if self.settle_s is not None
            else f"NOT SETTLED (deadline {self.plan.settle_timeout_s:.0f}s)"
        )
        per_job = ", ".join(
            f"{n} run{'s' if n != 1 else ''}: {jobs}"
            for n, jobs in sorted(verdict.executions_per_job.items())
        )
        done = self.faults_done
        cancel_answers = Counter(str(c.status) for c in self.cancels.values())
        delays = sorted(verdict.cancel_delays)
        delay_text = (
            f"; DELETE to CANCEL line median {delays[len(delays) // 2]:.2f}s, max {delays[-1]:.2f}s"
            if delays
            else ""
        )
        handed_back = sum(
            1 for f in verdict.fates if f.reason == "handed back by its stopping worker"
        )
        checks = (
            records.RETRIES,
            records.FINAL_STATE,
            records.SHUTDOWN_FAILED,
            records.CANCEL_HONOURED,
            records.HISTORY,
            records.WORKFLOWS,
            records.LIMITS,
        )
        table = [
            (
                "jobs",
                f"{len(self.submitted)} (REST {self.via_api}, SQL {self.via_sql}, "
                f"in {len(self.workflows)} workflows {4 * len(self.workflows)}; "
                f"async {types['async']}, thread {types['thread']}; "
                + ", ".join(f"{plan} {n}" for plan, n in sorted(kinds.items()))
                + ")",
            ),
            (
                "faults",
                f"worker SIGKILL {worker_kills}, worker SIGTERM {len(self.terms)} "
                f"(of which before a PostgreSQL outage {done['shutdown_outage']}), "
                f"scheduler SIGKILL {scheduler_kills}, NATS cluster restarts {done['nats']}, "
                f"NATS node kills {done['nats_node']}, PostgreSQL restarts "
                f"{done['postgres'] + done['shutdown_outage']}, worker cut off {done['cut']}, "
                f"PostgreSQL slow {done['slow']}",
            ),
            ("lost", f"{lost} (not terminal {len(stuck)}, missing {len(missing)})"),
            (
                "ran at once",
                f"{len(verdict.duplicates)} same attempt twice, "
                f"{len(verdict.overlapping_attempts)} two attempts",
            ),
            ("time to settle", settle),
            (
                "final states",
                "; ".join(
                    f"{plan}: " + ", ".join(f"{s} {n}" for s, n in sorted(states.items()))
                    for plan, states in sorted(by_plan.items())
                ),
            ),
            (
                "executions",
                f"{verdict.executions}; cut short by SIGKILL {verdict.cut_short_by_kill}; "
                f"handed back {handed_back}",
            ),
            ("executions per job", per_job),
            (
                "fates",
                f"{len(verdict.fates)}: explained "
                f"{sum(verdict.reasons(records.Judgement.EXPLAINED).values())}, "
                f"known limitation {len(verdict.limitations)}, "
                f"unexplained {len(verdict.unexplained)}",
            ),
            *(
                (f"  {judgement.value}", f"{n} {reason}")
                for judgement in records.Judgement
                for reason, n in sorted(verdict.reasons(judgement).items())
            ),
            (
                "cancellations",
                f"{len(self.cancels)} DELETEs answered ("
                + ", ".join(f"{s} x{n}" for s, n in sorted(cancel_answers.items()))
                + f"){delay_text}",
            ),
            (
                "limits",
                f"keyed jobs {sum(1 for x in specs if x.concurrency_key)}, most of one key "
                f"at once {verdict.key_peak} (limit {self.plan.key_limit}); rated jobs "
                f"{sum(1 for x in specs if x.rate_limit)}, most starts beyond "
                f"{self.plan.rate_per_s:g}/s {verdict.rate_excess:.1f} "
                f"(burst {self.plan.rate_burst})",
            ),
            *(
                (f"check: {check}", f"{len(verdict.problems_of(check))} problems")
                for check in checks
            ),
            ("attempts lost with a worker", str(sum(r.workers_lost for r in rows.values()))),
            ("FAILED after losing attempts to faults", str(len(verdict.failed_by_faults))),
            ("unexpected process exits", str(len(self.exits))),
            ("unhandled exceptions in logs", str(unhandled_exceptions(self.system.services))),
            ("REST answers", ", ".join(f"{k} x{v}" for k, v in sorted(self.api_answers.items()))),
        ]
        width = max(len(name) for name, _ in table)
        lines = [
            f"chaos run {self.plan.name!r}, seed {self.seed} (rerun with CHAOS_SEED={self.seed})",
            f"| {'metric':<{width}} | value",
            f"|{'-' * (width + 2)}|------",
            *(f"| {name:<{width}} | {value}" for name, value in table),
            "",
            "timeline:",
            *self._timeline(parsed),
        ]

        if lost:
            lines += ["", *self._stuck(stuck, missing, parsed)]
            stuck_states = Counter(row.state for row in stuck)
            problems.append(
                f"{lost} jobs lost: {len(stuck)} not terminal after the settle "
                f"({', '.join(f'{s} {n}' for s, n in sorted(stuck_states.items()))})"
                f", {len(missing)} missing from the database; first ones:\n"
                + "\n".join(f"  {row.id} {row.state} attempt {row.attempt}" for row in stuck[:20])
                + "".join(f"\n  {job_id} MISSING" for job_id in missing[:20])
            )
        if self.not_submitted:
            problems.append(f"never submitted: {'; '.join(self.not_submitted[:10])}")
        if self.not_cancelled:
            problems.append(f"DELETE never answered for {', '.join(self.not_cancelled[:10])}")
        if self.snapshot.strangers:
            problems.append(f"{self.snapshot.strangers} jobs in the database that nobody submitted")
        for found, what in (
            (verdict.duplicates, "attempts ran twice at the same time"),
            (verdict.overlapping_attempts, "times two attempts of one job ran at the same time"),
        ):
            if found:
                shown = [
                    f"  {d.first.job_id}: {d.first.describe(faults, origin)} | "
                    f"{d.second.describe(faults, origin)}"
                    for d in found[:20]
                ]
                problems.append(f"{len(found)} {what}:\n" + "\n".join(shown))
        if verdict.unexplained:
            problems.append(
                f"{len(verdict.unexplained)} executions or counted attempts that nothing the "
                "run did explains:\n" + "\n".join(self._fates(verdict.unexplained[:20]))
            )
        if verdict.limitations:
            lines += [
                "",
                f"known limitation, {len(verdict.limitations)} times: "
                f"{records.LOST_TO_SHUTDOWN_IN_OUTAGE} (a worker that must exit while "
                "PostgreSQL is away leaves its jobs RUNNING; they are taken back counted):",
                *self._fates(verdict.limitations[:20]),
            ]
        if verdict.succeeded_unrun:
            problems.append(
                f"{len(verdict.succeeded_unrun)} SUCCEEDED jobs without a finished execution of "
                f"their last attempt: {', '.join(verdict.succeeded_unrun[:10])}"
            )
        for check in checks:
            failed = verdict.problems_of(check)
            if failed:
                problems.append(
                    f"{len(failed)} jobs fail the check '{check}':\n"
                    + "\n".join(
                        f"  {p.job_id} ({rows[p.job_id].plan}, {rows[p.job_id].state}): {p.text}"
                        for p in failed[:20]
                    )
                )
        if verdict.strangers or parsed.bad_lines:
            problems.append(
                f"executions file: {len(verdict.strangers)} executions of unknown jobs, "
                f"{len(parsed.bad_lines)} bad lines {parsed.bad_lines[:5]}"
            )
        if self.exits:
            lines += ["", "processes that exited on their own:"]
            for exit_ in self.exits[:MAX_REPLACEMENTS]:
                lines += [
                    f"  {exit_.role} pid {exit_.pid} code {exit_.code} at "
                    f"+{exit_.at - origin:.2f}s; last log lines:",
                    *(f"    {line}" for line in exit_.log_tail.splitlines()),
                ]
            problems.append(
                f"{len(self.exits)} processes exited instead of riding out the faults: "
                + ", ".join(f"{e.role} pid {e.pid} (code {e.code})" for e in self.exits[:10])
            )
        if self.term_problems:
            problems.append(
                f"{len(self.term_problems)} SIGTERMed processes did not stop cleanly:\n"
                + "\n".join(self.term_problems[:5])
            )
        if self.not_ready:
            problems.append(
                f"{len(self.not_ready)} processes not ready after the chaos:\n"
                + "\n".join(self.not_ready[:5])
            )
        if self.api_errors:
            problems.append(
                f"{len(self.api_errors)} unexpected REST answers: {self.api_errors[:5]}"
            )
        lines += ["", *self.straggler_logs(), *log_summary(self.system.services)]
        return "\n".join(lines), problems

    def _fates(self, fates: Sequence[records.Fate]) -> list[str]:
        """One line per fate, with the job's final row."""
        assert self.snapshot is not None
        lines = []
        for fate in fates:
            row = self.snapshot.rows[fate.job_id]
            run = (
                fate.execution.describe(self.faults, self.origin)
                if fate.execution is not None
                else f"attempt {fate.attempt}, never executed"
            )
            lines.append(
                f"  {fate.job_id} ({row.plan}, {row.state}, counted attempt {row.attempt}): "
                f"{run} -- {fate.reason}"
            )
        return lines

    def _timeline(self, parsed: records.Parsed) -> list[str]:
        """The timeline, each worker kill with the executions it cut short, each SIGTERM
        with the executions its worker stopped."""
        cut: Counter[int] = Counter(
            run.pid
            for run in parsed.executions
            if run.ended is None and self.faults.killed(run) is not None
        )
        stopped: Counter[int] = Counter(
            run.pid
            for run in parsed.executions
            if run.cancelled
            and run.ended is not None
            and run.ended >= self.terms.get(run.pid, float("inf"))
        )
        lines = []
        for moment, text in self.timeline:
            if match := re.match(r"SIGKILL worker pid (\d+)", text):
                text += f" (cut short {cut[int(match.group(1))]} executions)"
            elif match := re.match(r"SIGTERM worker pid (\d+)", text):
                text += f" (it stopped {stopped[int(match.group(1))]} executions)"
            lines.append(f"  +{moment - self.origin:6.2f}s  {text}")
        return lines

    def _stuck(
        self, stuck: Sequence[records.JobRow], missing: Sequence[str], parsed: records.Parsed
    ) -> list[str]:
        """Which jobs are stuck, in which state, and what their executions say about why."""
        assert self.snapshot is not None
        runs: dict[str, list[records.Execution]] = {}
        for run in parsed.executions:
            runs.setdefault(run.job_id, []).append(run)
        causes: Counter[tuple[str, str]] = Counter()
        detail: list[str] = []
        now = time.time()
        for row in stuck:
            mine = runs.get(row.id, [])
            last = max(mine, key=lambda r: r.started) if mine else None
            if last is None:
                cause = "never executed"
            elif last.attempt != row.attempt:
                cause = f"last execution was attempt {last.attempt}"
            elif last.ended is None and self.faults.killed(last) is not None:
                cause = "its execution was cut short by SIGKILL"
            elif last.ended is not None:
                cause = f"its execution ended ({last.end}), the outcome was not recorded"
            else:
                cause = "its execution has no end line"
            causes[(row.state, cause)] += 1
            if len(detail) < STUCK_SHOWN:
                age = now - self.snapshot.updated_at[row.id]
                executions = "; ".join(r.describe(self.faults, self.origin) for r in mine)
                detail.append(
                    f"  {row.id} {row.state:<9} attempt {row.attempt}/{row.max_attempts}, "
                    f"unchanged for {age:.1f}s, last_error={row.last_error!r}; "
                    f"executions: {executions or 'none'}"
                )
        lines = [f"stuck jobs ({len(stuck)} not terminal, {len(missing)} missing):"]
        lines += [f"  {n:5} {state}: {cause}" for (state, cause), n in sorted(causes.items())]
        lines += [f"first {min(len(stuck), STUCK_SHOWN)}:", *detail]
        lines += [f"  {job_id} MISSING from the database" for job_id in missing[:STUCK_SHOWN]]
        return lines


_UNHANDLED = ("Task exception was never retrieved", "unhandled error", "Exception in callback")


def unhandled_exceptions(services: Sequence[Service]) -> int:
    """Log lines that say a task or a request died of an exception nobody handled."""
    return sum(
        1
        for service in services
        if service.log_path.exists()
        for line in service.log().splitlines()
        if any(marker in line for marker in _UNHANDLED)
    )


_LEVEL = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (\w+)\s+(\S+)\s+(.*?)(?:  \S+=|$)")


def log_summary(services: Sequence[Service]) -> list[str]:
    """Warnings and errors of every process, counted by role and message."""
    counts: Counter[tuple[str, str, str]] = Counter()
    raw: Counter[tuple[str, str]] = Counter()
    for service in services:
        if not service.log_path.exists():
            continue
        for line in service.log().splitlines():
            match = _LEVEL.match(line)
            if match is None:
                raw[(service.role, line[:160])] += 1
            elif match.group(1) in ("WARNING", "ERROR", "CRITICAL"):
                counts[(service.role, match.group(1), match.group(3))] += 1
    lines = ["service log warnings and errors (role, level, message: count):"]
    lines += [
        f"  {role:<9} {level:<8} {message}: {n}"
        for (role, level, message), n in sorted(counts.items())
    ]
    if raw:
        lines.append("lines outside the log format (tracebacks, crashes):")
        lines += [f"  {role:<9} {line}: {n}" for (role, line), n in sorted(raw.items())[:30]]
    return lines


def describe_plan(plan: Plan, seed: int) -> str:
    """One line saying what the run will do."""
    values: dict[str, Any] = {
        "jobs": plan.jobs,
        "schedulers": plan.schedulers,
        "workers": plan.workers,
        "chaos_s": plan.chaos_s,
        "nats": "/".join(plan.nats_restarts) or "-",
        "nats_node_kills": plan.nats_node_kills,
        "postgres": "/".join(plan.postgres_restarts) or "-",
        "shutdown_outages": plan.shutdown_outages,
        "cuts": plan.cuts,
        "latencies_ms": "/".join(map(str, plan.latencies_ms)) or "-",
    }
    return f"chaos {plan.name} seed={seed} " + " ".join(f"{k}={v}" for k, v in values.items())
