"""The `orchestrix` command as a user runs it: help texts, bad settings, the dev stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from orchestrix.settings import VARIABLES

from tests.conftest import free_port_run
from tests.e2e.harness import REPO, until

pytestmark = pytest.mark.timeout(120)


def orchestrix(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrix.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (
            "api",
            [
                "DATABASE_URL",
                "DB_HOST",
                "API_PORT",
                "API_SHUTDOWN_TIMEOUT",
                "NATS_URL",
                "LOG_FORMAT",
            ],
        ),
        (
            "scheduler",
            [
                "DATABASE_URL",
                "NATS_URL",
                "LEASE_TIMEOUT",
                "MAINTENANCE_INTERVAL",
                "RETRY_BASE_DELAY",
                "RETRY_MAX_DELAY",
                "METRICS_PORT",
            ],
        ),
        (
            "worker",
            [
                "WORKER_CONCURRENCY",
                "WORKER_QUEUES",
                "WORKER_POLL_INTERVAL",
                "LEASE_TIMEOUT",
                "SHUTDOWN_TIMEOUT",
                "RETRY_BASE_DELAY",
                "ORCHESTRIX_EXECUTORS",
                "METRICS_PORT",
            ],
        ),
        ("migrate", ["DATABASE_URL", "DB_SSLMODE"]),
        ("dev", ["DATABASE_URL", "NATS_URL", "API_PORT"]),
    ],
)
def test_help_says_what_and_which_variables(command: str, variables: list[str]) -> None:
    result = orchestrix(command, "--help")
    assert result.returncode == 0
    assert "environment variables:" in result.stdout
    for variable in variables:
        assert f"  {variable} " in result.stdout


def test_every_variable_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [name for name, _, _ in VARIABLES if f"`{name}`" not in readme]
    assert missing == []


def test_the_readme_configuration_table_is_exactly_the_variables() -> None:
    """No variable the code has dropped lingers in the table, and every default is the code's."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", section, flags=re.MULTILINE)
    documented = [(name, default.strip()) for name, default in rows]
    expected = [(name, f"`{default}`" if default else "(unset)") for name, default, _ in VARIABLES]
    assert documented == expected


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"API_PORT": "eighty"}, "API_PORT: must be an integer, got 'eighty'"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY: must be between 1 and 10000, got 0"),
        ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT: must be a duration"),
    ],
)
def test_a_bad_setting_stops_the_process_with_one_line(env: dict[str, str], line: str) -> None:
    for command in ("api", "worker"):
        result = orchestrix(command, env=env)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert line in lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--concurrency", "0"], "WORKER_CONCURRENCY: must be between 1 and 10000, got 0"),
        (["--concurrency", "many"], "WORKER_CONCURRENCY: must be an integer, got 'many'"),
        (["--executors", "a b"], "ORCHESTRIX_EXECUTORS: 'a b' is not an import path"),
        (["--executors", "no_such_module_here"], "cannot load executors: No module named"),
    ],
)
def test_bad_worker_flags_stop_it_with_one_line(args: list[str], line: str) -> None:
    result = orchestrix("worker", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert line in result.stderr


def test_migrate_create_refuses_a_bad_name_in_one_line() -> None:
    result = orchestrix("migrate", "create", "Bad-Name")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "orchestrix migrate create: migration name 'Bad-Name': "
        "use lowercase letters, digits and underscores"
    )


async def test_dev_runs_everything_and_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    # The API, then the scheduler's and the worker's status ports (METRICS_PORT up).
    api_port = free_port_run(3)
    status_port = api_port + 1
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    env |= {"API_PORT": str(api_port), "METRICS_PORT": str(status_port), "WORKERS": "1"}
    log = (tmp_path / "dev.log").open("wb")
    # Popen only starts the process; it does not block the loop.
    dev = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "orchestrix.cli", "dev", "--data-dir", str(tmp_path / "data")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{api_port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"{url}/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await until(ready, 60, "the dev stack", lambda: (tmp_path / "dev.log").read_text())
            async with http.post(f"{url}/api/v1/jobs", json={"type": "demo_job"}) as response:
                job_id = (await response.json())["id"]

            async def succeeded() -> bool:
                assert dev.poll() is None, (tmp_path / "dev.log").read_text()
                async with http.get(f"{url}/api/v1/jobs/{job_id}") as response:
                    state: str = (await response.json())["state"]
                    return state == "SUCCEEDED"

            await until(succeeded, 30, "the job to run", lambda: (tmp_path / "dev.log").read_text())
            children = psutil.Process(dev.pid).children(recursive=True)
            assert len(children) >= 5  # api, scheduler, worker, postgres, nats

            def listening() -> list[Any]:
                return [
                    conn.laddr
                    for child in children
                    for conn in child.net_connections(kind="inet")
                    if conn.status == psutil.CONN_LISTEN
                ]

            # The job may run before the scheduler serves its status port (workers
            # claim without it).
            await until(
                lambda: (
                    {api_port, status_port, status_port + 1} <= {addr.port for addr in listening()}
                ),
                30,
                "the API's and the status ports",
                lambda: f"{listening()}\n{(tmp_path / 'dev.log').read_text()}",
            )
        # Auth is off, so nothing may listen beyond this machine.
        assert {addr.ip for addr in listening()} <= {"127.0.0.1", "::1"}, listening()
        dev.send_signal(signal.SIGINT)
        assert dev.wait(60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if dev.poll() is None:
            for process in psutil.Process(dev.pid).children(recursive=True):
                process.kill()
            dev.kill()
        dev.wait()
        log.close()
    output = (tmp_path / "dev.log").read_text()
    assert f"Orchestrix is running. API: http://127.0.0.1:{api_port} " in output
    assert "no API keys needed (API_AUTH=off); listening on 127.0.0.1 only" in output
    assert re.search(rf"scheduler: +http://127.0.0.1:{status_port}/metrics", output)
    for prefix in ("api       | ", "scheduler | ", "worker    | "):
        assert prefix in output
