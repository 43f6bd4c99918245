"""One chaos run: real services on the suite's own servers, faults injected while jobs flow.

A :class:`ChaosRun` starts the API, the schedulers and the workers as processes
(with ``tests/e2e/harness.System``), submits jobs over REST and by bulk SQL at a
steady pace, and meanwhile carries out a seeded :func:`schedule` of faults:
SIGKILL a worker (a replacement starts at once), SIGKILL a scheduler, restart
NATS, restart PostgreSQL. A watchdog notices any process that exits without
being told to, records its last log lines and starts a replacement, so one
crash does not hide every other finding.

When the faults are over it waits for every job to reach a terminal state (the
*settle*), checks that every surviving process reports ready again, and judges
the executions file (``tests/chaos/records.py``). :meth:`ChaosRun.report`
returns the printed table, and the list of problems the test asserts is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson
import psutil
from orchestrix import ids
from orchestrix.db.pool import init_connection

from tests.chaos import records
from tests.chaos.executors import JOB_TYPE, RECORDS_ENV
from tests.chaos.servers import ChaosServers
from tests.e2e.harness import Service, System

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
MAX_ATTEMPTS = 10
# Database errors that mean "the server is away": the suite's own queries wait them out.
DB_AWAY = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
)
STUCK_SHOWN = 40
# Processes that exit on their own are replaced this many times, then no more: a
# service that cannot start at all must not turn the run into a crash loop.
MAX_REPLACEMENTS = 5


@dataclass(frozen=True)
class Plan:
    """What a chaos run does. Times are seconds from the start of the chaos window."""

    name: str
    jobs: int
    api_share: float  # the fraction of jobs created over REST; the rest by bulk SQL
    submit_s: float  # submissions are spread evenly over this time
    chaos_s: float  # faults happen within this window
    max_sleep_ms: int  # each job works a random 0..max_sleep_ms
    schedulers: int
    workers: int
    worker_concurrency: int
    worker_kill_gap_s: tuple[float, float]  # time between two worker kills
    scheduler_kills: tuple[str, ...]  # "leader" (the one running maintenance) or "follower"
    nats_restarts: tuple[str, ...]  # "SIGTERM" or "SIGKILL", one entry per restart
    postgres_restarts: tuple[str, ...]  # "fast" or "immediate", one entry per restart
    outage_s: tuple[float, float]  # how long a stopped server stays down
    settle_timeout_s: float


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: ``kind`` is kill_worker, kill_scheduler, nats or postgres."""

    at_s: float
    kind: str
    how: str  # the signal or shutdown mode; for a scheduler, "leader" or "follower"
    pause_s: float  # down time of a server, or the delay before a replacement starts


def schedule(plan: Plan, rng: random.Random) -> list[Fault]:
    """The faults of a run, in time order; the same seed gives the same schedule.

    Scheduler kills and server restarts get a slot each in random order, so two
    of them never overlap; worker kills fall anywhere in the window.
    """
    big = [("kill_scheduler", which) for which in plan.scheduler_kills]
    big += [("nats", how) for how in plan.nats_restarts]
    big += [("postgres", how) for how in plan.postgres_restarts]
    rng.shuffle(big)
    faults: list[Fault] = []
    first, last = 0.1 * plan.chaos_s, 0.75 * plan.chaos_s
    slot = (last - first) / max(len(big), 1)
    for i, (kind, how) in enumerate(big):
        at = first + slot * (i + rng.uniform(0.1, 0.6))
        pause = rng.uniform(*plan.outage_s) if kind in ("nats", "postgres") else rng.uniform(0, 1)
        faults.append(Fault(at, kind, how, pause))
    at = rng.uniform(*plan.worker_kill_gap_s)
    while at < 0.9 * plan.chaos_s:
        faults.append(Fault(at, "kill_worker", "SIGKILL", rng.uniform(0, 0.5)))
        at += rng.uniform(*plan.worker_kill_gap_s)
    return sorted(faults, key=lambda fault: fault.at_s)


@dataclass(frozen=True)
class JobSpec:
    """A job to submit: by REST (with an idempotency key, so retries create it once) or SQL."""

    index: int
    via_api: bool
    sleep_ms: int
    id: str | None  # chosen by the suite for SQL inserts; the API chooses its own


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
    kills: dict[int, float] = field(default_factory=dict)
    kill_roles: dict[int, str] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    via_api: int = 0
    via_sql: int = 0
    not_submitted: list[str] = field(default_factory=list)
    api_answers: Counter[str] = field(default_factory=Counter)
    api_errors: list[str] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)
    origin: float = 0.0
    settle_s: float | None = None
    snapshot: Snapshot | None = None
    stragglers: set[str] = field(default_factory=set)
    _stopping: bool = False

    def __post_init__(self) -> None:
        self.records_path = self.workdir / "executions.csv"
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

    def start(self, role: str) -> Service:
        """Start a process of ``role`` and count it among the living."""
        service = self.system.start(role)
        self.alive.append(service)
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
                tail = "\n".join(service.log().splitlines()[-25:])
                self.exits.append(Exit(service.role, service.process.pid, code, time.time(), tail))
                text = f"{service.role} pid {service.process.pid} EXITED on its own (code {code})"
                if len(self.exits) <= MAX_REPLACEMENTS:
                    text += f"; started pid {self.start(service.role).process.pid}"
                else:
                    text += "; not replaced, too many exits"
                self.note(text)
            await asyncio.sleep(0.2)

    async def start_services(self) -> None:
        """The API, the schedulers and the workers, each answering /ready."""
        services = [self.start("api")]
        services += [self.start("scheduler") for _ in range(self.plan.schedulers)]
        services += [self.start("worker") for _ in range(self.plan.workers)]
        await asyncio.gather(*(self.system.ready(s, 30) for s in services))

    async def stop_services(self) -> None:
        """SIGTERM every process still running, SIGKILL what has not exited 15 s later."""
        self._stopping = True
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

    # --- faults --------------------------------------------------------------

    async def inject(self, faults: Sequence[Fault], rng: random.Random) -> None:
        """Carry out the faults one after another, each at its time or as soon as possible."""
        for fault in faults:
            delay = self.origin + fault.at_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if fault.kind in ("kill_worker", "kill_scheduler"):
                role = fault.kind.removeprefix("kill_")
                candidates = [s for s in self.alive if s.role == role]
                what = ""
                if role == "scheduler":
                    leader = await self.leader()
                    what = " (leader unknown)" if leader is None else f" (a {fault.how})"
                    if leader is not None:
                        if fault.how == "leader":
                            candidates = [leader]
                        elif len(candidates) > 1:
                            candidates.remove(leader)
                if not candidates:
                    self.note(f"no {role} to SIGKILL")
                    continue
                victim = rng.choice(candidates)
                await self.kill(victim)
                self.note(f"SIGKILL {role} pid {victim.process.pid}{what}")
                await asyncio.sleep(fault.pause_s)
                self.note(f"started {role} pid {self.start(role).process.pid}")
            elif fault.kind == "nats":
                await self.servers.stop_nats(signal.Signals[fault.how])
                self.restarts[f"nats {fault.how}"] += 1
                self.note(f"NATS stopped ({fault.how})")
                await asyncio.sleep(fault.pause_s)
                await self.servers.start_nats()
                self.note("NATS started")
            elif fault.kind == "postgres":
                await self.servers.stop_postgres(fault.how)
                self.restarts[f"postgres {fault.how}"] += 1
                self.note(f"PostgreSQL stopped ({fault.how})")
                await asyncio.sleep(fault.pause_s)
                await self.servers.start_postgres()
                self.note("PostgreSQL started")
            else:
                raise ValueError(f"unknown fault {fault.kind!r}")

    # --- jobs ---------------------------------------------------------------

    def specs(self, rng: random.Random) -> list[JobSpec]:
        """Every job of the run, drawn from the seeded ``rng``."""
        return [
            JobSpec(
                index=i,
                via_api=(api := rng.random() < self.plan.api_share),
                sleep_ms=rng.randint(0, self.plan.max_sleep_ms),
                id=None if api else ids.new_id(),
            )
            for i in range(self.plan.jobs)
        ]

    async def submit(self, specs: Sequence[JobSpec], give_up_s: float) -> None:
        """Submit at an even pace over ``plan.submit_s``; retry through outages."""
        posts: list[asyncio.Task[None]] = []
        inserts: list[asyncio.Task[None]] = []
        gate = asyncio.Semaphore(16)
        give_up = time.monotonic() + give_up_s
        async with aiohttp.ClientSession() as http:
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
                        posts.append(asyncio.create_task(self._post(http, gate, spec, give_up)))
                await asyncio.sleep(0.2)
            await asyncio.gather(*posts, *inserts)

    async def _insert(self, batch: Sequence[JobSpec], give_up: float) -> None:
        """Insert a batch in one statement, as a bulk loader would, through outages."""
        job_ids = [spec.id for spec in batch if spec.id is not None]
        payloads = [orjson.dumps({"sleep_ms": spec.sleep_ms}).decode() for spec in batch]

        async def insert(conn: asyncpg.Connection) -> None:
            # ON CONFLICT: a retry after a commit whose answer was lost inserts nothing.
            await conn.execute(
                "INSERT INTO jobs (id, type, payload, max_attempts) "
                "SELECT id, $3, payload::jsonb, $4 FROM unnest($1::text[], $2::text[]) "
                "AS t(id, payload) ON CONFLICT (id) DO NOTHING",
                job_ids,
                payloads,
                JOB_TYPE,
                MAX_ATTEMPTS,
            )

        try:
            await self.with_db(insert, give_up - time.monotonic())
        except TimeoutError:
            self.not_submitted += [f"SQL insert of {len(job_ids)} jobs"]
            return
        self.submitted += job_ids
        self.via_sql += len(job_ids)

    async def _post(
        self, http: aiohttp.ClientSession, gate: asyncio.Semaphore, spec: JobSpec, give_up: float
    ) -> None:
        """Create one job over REST, retrying with the same idempotency key."""
        body = {
            "type": JOB_TYPE,
            "payload": {"sleep_ms": spec.sleep_ms},
            "max_attempts": MAX_ATTEMPTS,
            "idempotency_key": f"chaos-{self.seed}-{spec.index}",
        }
        delay = 0.1
        async with gate:
            while time.monotonic() < give_up:
                url = f"http://127.0.0.1:{self.api.port}/api/v1/jobs"
                try:
                    async with http.post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=10)
                    ) as response:
                        self.api_answers[str(response.status)] += 1
                        text = await response.text()
                        if response.status in (200, 201):
                            self.submitted.append(orjson.loads(text)["id"])
                            self.via_api += 1
                            return
                        if response.status != 503:
                            self.api_errors.append(f"{response.status} {text[:300]}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.api_answers[type(exc).__name__] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.not_submitted.append(f"job #{spec.index} over REST")

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
        self.origin = time.time()
        self.note(f"chaos starts: {len(faults)} faults planned")
        watchdog = asyncio.create_task(self.watch())
        try:
            give_up_s = self.plan.submit_s + self.plan.chaos_s + 60
            await asyncio.gather(self.submit(specs, give_up_s), self.inject(faults, pick))
            self.note("chaos over: every fault repaired, every job submitted")
            await self.settle()
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
            "SELECT id, state, attempt, max_attempts, last_error, errors, "
            "extract(epoch FROM updated_at)::float8 AS updated FROM jobs WHERE id = ANY($1)",
            list(self.submitted),
        )
        total: int = await conn.fetchval("SELECT count(*) FROM jobs")
        return Snapshot(
            rows={
                row["id"]: records.JobRow(
                    id=row["id"],
                    state=row["state"],
                    attempt=row["attempt"],
                    max_attempts=row["max_attempts"],
                    last_error=row["last_error"],
                    errors=row["errors"],
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

    def verdict(self) -> tuple[records.Parsed, records.Verdict]:
        """The executions file, parsed and judged against the final rows."""
        text = self.records_path.read_text() if self.records_path.exists() else ""
        parsed = records.parse(text)
        rows = self.snapshot.rows if self.snapshot else {}
        return parsed, records.judge(parsed.executions, rows, self.kills, self.origin)

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
        problems: list[str] = []
        by_state = Counter(row.state for row in rows.values())
        missing = sorted(set(self.submitted) - set(rows))
        stuck = sorted(
            (row for row in rows.values() if row.state not in records.TERMINAL),
            key=lambda row: (row.state, row.id),
        )
        lost = len(stuck) + len(missing)
        failed = [row for row in rows.values() if row.state == "FAILED"]
        failed_lost = [row for row in failed if row.workers_lost == len(row.errors) == row.attempt]
        worker_kills = sum(1 for role in self.kill_roles.values() if role == "worker")
        scheduler_kills = sum(1 for role in self.kill_roles.values() if role == "scheduler")
        nats = sum(n for what, n in self.restarts.items() if what.startswith("nats"))
        postgres = sum(n for what, n in self.restarts.items() if what.startswith("postgres"))
        settle = (
            f"{self.settle_s:.1f}s"
            if self.settle_s is not None
            else f"NOT SETTLED (deadline {self.plan.settle_timeout_s:.0f}s)"
        )
        per_job = ", ".join(
            f"{n} run{'s' if n != 1 else ''}: {jobs}"
            for n, jobs in sorted(verdict.executions_per_job.items())
        )
        restarts_detail = ", ".join(f"{what} x{n}" for what, n in sorted(self.restarts.items()))
        states = ", ".join(f"{state} {n}" for state, n in sorted(by_state.items()))
        table = [
            ("jobs", f"{len(self.submitted)} (REST {self.via_api}, SQL {self.via_sql})"),
            (
                "kills",
                f"{worker_kills + scheduler_kills} (workers {worker_kills}, "
                f"schedulers {scheduler_kills})",
            ),
            (
                "restarts",
                f"{nats + postgres} (nats {nats}, postgres {postgres}; {restarts_detail})",
            ),
            ("lost", f"{lost} (not terminal {len(stuck)}, missing {len(missing)})"),
            ("duplicates", str(len(verdict.duplicates))),
            ("time to settle", settle),
            ("final states", states),
            (
                "executions",
                f"{verdict.executions}; cut short by SIGKILL {verdict.cut_short_by_kill}",
            ),
            ("executions per job", per_job),
            (
                "extra executions",
                f"{len(verdict.explained)} explained by kills, "
                f"{len(verdict.unexplained)} unexplained",
            ),
            *(
                (f"  {'' if ok else 'un'}explained", f"{n} {reason}")
                for ok in (True, False)
                for reason, n in sorted(verdict.reasons(ok).items())
            ),
            ("attempts lost with a worker", str(sum(r.workers_lost for r in rows.values()))),
            ("FAILED after losing workers", str(len(failed_lost))),
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
        if self.snapshot.strangers:
            problems.append(f"{self.snapshot.strangers} jobs in the database that nobody submitted")
        origin = self.origin
        if verdict.duplicates:
            shown = [
                f"  {d.first.job_id}: {d.first.describe(self.kills, origin)} | "
                f"{d.second.describe(self.kills, origin)}"
                for d in verdict.duplicates[:20]
            ]
            problems.append(
                f"{len(verdict.duplicates)} attempts ran twice at the same time:\n"
                + "\n".join(shown)
            )
        if verdict.unexplained:
            shown = [
                f"  {e.execution.job_id} ({rows[e.execution.job_id].state}, counted attempt "
                f"{rows[e.execution.job_id].attempt}): {e.execution.describe(self.kills, origin)}"
                f" -- {e.reason}"
                for e in verdict.unexplained[:20]
            ]
            problems.append(
                f"{len(verdict.unexplained)} extra executions not explained by a kill:\n"
                + "\n".join(shown)
            )
        if verdict.succeeded_unrun:
            problems.append(
                f"{len(verdict.succeeded_unrun)} SUCCEEDED jobs without a finished execution of "
                f"their last attempt: {', '.join(verdict.succeeded_unrun[:10])}"
            )
        other_failed = [row for row in failed if row not in failed_lost]
        other_failed += [row for row in rows.values() if row.state == "CANCELLED"]
        if other_failed:
            problems.append(
                f"{len(other_failed)} jobs FAILED or CANCELLED for another reason than lost "
                "workers:\n"
                + "\n".join(f"  {r.id} {r.state}: {r.last_error}" for r in other_failed[:20])
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
        if self.not_ready:
            problems.append(
                f"{len(self.not_ready)} processes not ready after the chaos:\n"
                + "\n".join(self.not_ready[:5])
            )
        unexpected_api = [e for e in self.api_errors if not e.startswith("503")]
        if unexpected_api:
            problems.append(
                f"{len(unexpected_api)} REST answers other than 200/201/503: {unexpected_api[:5]}"
            )
        if verdict.overlapping_attempts:
            lines += [
                "",
                f"note: {len(verdict.overlapping_attempts)} times two attempts of one job ran at "
                "the same time (an old attempt still running when the next one started):",
                *(
                    f"  {d.first.job_id}: {d.first.describe(self.kills, origin)} | "
                    f"{d.second.describe(self.kills, origin)}"
                    for d in verdict.overlapping_attempts[:10]
                ),
            ]
        lines += ["", *self.straggler_logs(), *log_summary(self.system.services)]
        return "\n".join(lines), problems

    def _timeline(self, parsed: records.Parsed) -> list[str]:
        """The timeline, each worker kill with the executions it cut short."""
        cut: Counter[int] = Counter(
            run.pid
            for run in parsed.executions
            if run.ended is None and run.killed_by(self.kills) is not None
        )
        lines = []
        for moment, text in self.timeline:
            match = re.match(r"SIGKILL worker pid (\d+)", text)
            if match:
                text += f" (cut short {cut[int(match.group(1))]} executions)"
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
            elif last.ended is None and last.killed_by(self.kills) is not None:
                cause = "its execution was cut short by SIGKILL"
            elif last.finished:
                cause = "its execution finished, the outcome was not recorded"
            else:
                cause = "its execution has no END"
            causes[(row.state, cause)] += 1
            if len(detail) < STUCK_SHOWN:
                age = now - self.snapshot.updated_at[row.id]
                executions = "; ".join(r.describe(self.kills, self.origin) for r in mine) or "none"
                detail.append(
                    f"  {row.id} {row.state:<9} attempt {row.attempt}/{row.max_attempts}, "
                    f"unchanged for {age:.1f}s, last_error={row.last_error!r}; "
                    f"executions: {executions}"
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
        "nats": "/".join(plan.nats_restarts),
        "postgres": "/".join(plan.postgres_restarts),
    }
    return f"chaos {plan.name} seed={seed} " + " ".join(f"{k}={v}" for k, v in values.items())
