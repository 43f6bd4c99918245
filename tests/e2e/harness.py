"""Runs Orchestrix services as real processes for end-to-end tests.

Each test system gets its own NATS stream, subject prefix and consumer, so
systems in one run (and runs on one machine) never share messages.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from orchestrix.devstack import die_with_parent

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)


@dataclass
class System:
    """A set of service processes sharing one database and one set of NATS names."""

    database_url: str
    nats_url: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    executions: Path = field(init=False)

    def __post_init__(self) -> None:
        tag = secrets.token_hex(4)
        # Where tests.e2e.executors record each execution.
        self.executions = self.workdir / f"executions-{tag}.csv"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats_url,
            "NATS_SUBJECT_PREFIX": f"orxtest.{tag}.jobs",
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "info",
            "RETRY_BASE_DELAY": "200ms",
            "RETRY_MAX_DELAY": "2s",
            "WORKER_POLL_INTERVAL": "200ms",
            "DB_POOL_MAX_SIZE": "12",
            "ORCHESTRIX_EXECUTORS": "tests.e2e.executors",
            "WORKER_DEMO_EXECUTORS": "true",
            "ORX_TEST_EXECUTIONS": str(self.executions),
            # Without keys, and so on this machine only (an API with auth off
            # refuses any other address).
            "API_AUTH": "off",
            "API_HOST": "127.0.0.1",
            "METRICS_HOST": "127.0.0.1",
            **self.env,
        }

    def start(self, role: str, *args: str, **env: str) -> Service:
        port = free_port()
        variables = {
            **self.env,
            **env,
            ("API_PORT" if role == "api" else "METRICS_PORT"): str(port),
        }
        log_path = self.workdir / f"{role}-{len(self.services)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestrix.cli", role, *args],
                env=variables,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                # Tied to the test process: killed with it, even if it is SIGKILLed
                # (a CI timeout), so no service outlives a run.
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
            )
        service = Service(role, process, log_path, port)
        self.services.append(service)
        return service

    async def ready(self, service: Service, timeout_s: float = 20.0) -> None:
        """Wait until the service's /ready answers 200."""
        await until(
            lambda: _is_ready(service.port),
            timeout_s,
            f"{service.role} ready",
            lambda: service.log(),
        )

    def stop_all(self) -> None:
        for service in self.services:
            service.signal(signal.SIGTERM)
        for service in self.services:
            try:
                service.wait(40)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.wait(5)


async def _is_ready(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/ready", timeout=aiohttp.ClientTimeout(total=2)
            ) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):  # not up yet, or too busy to answer in time
        return False


async def until(
    check: Callable[[], Any],
    timeout_s: float,
    what: str,
    explain: Callable[[], str] | None = None,
    every_s: float = 0.05,
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{detail}")
        await asyncio.sleep(every_s)


def read_executions(path: Path, *, stopped: bool = False) -> list[dict[str, str]]:
    """The lines the test executors appended: one per execution that ran to its end
    (``stopped``: also one per execution its worker stopped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        job_id, attempt, pid, start, end, how = line.split(",")
        if how == "done" or stopped:
            rows.append(
                {
                    "id": job_id,
                    "attempt": attempt,
                    "pid": pid,
                    "start": start,
                    "end": end,
                    "how": how,
                }
            )
    return rows
