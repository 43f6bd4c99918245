"""No secret in any output: every service, run for real with sentinel secrets.

The database password, the NATS password and the NATS token are sentinels
(``SENTINEL-...``). Each service runs against the servers of the ``secure``
fixture (TLS and authentication, tests/secure_servers.py), at LOG_LEVEL=debug,
through a job's whole life; then with bad configurations, with an unreachable
server and with refused credentials; and with ``--help``. None of what they
print, nor any /metrics page, may hold a sentinel.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Secure, free_port
from tests.e2e.harness import REPO, System
from tests.secure_servers import APP_ROLE, NATS_USER, create_database

SERVICES = ("api", "scheduler", "worker", "migrate")


def secure_env(secure: Secure, database: str) -> dict[str, str]:
    return {
        # Unset: the DB_* parts are used (the harness would give its own URL).
        "DATABASE_URL": "",
        "DB_HOST": "localhost",
        "DB_PORT": str(secure.postgres.port),
        "DB_USER": APP_ROLE,
        "DB_NAME": database,
        "DB_PASSWORD_FILE": str(secure.secrets_dir / "db"),
        "DB_SSLMODE": "verify-full",
        "DB_SSLROOTCERT": str(secure.pki.ca),
        "NATS_URL": f"tls://localhost:{secure.nats.port}",
        "NATS_TLS_CA": str(secure.pki.ca),
        "NATS_TLS_CERT": str(secure.pki.client_cert),
        "NATS_TLS_KEY": str(secure.pki.client_key),
        "NATS_USER": NATS_USER,
        "NATS_PASSWORD_FILE": str(secure.secrets_dir / "nats"),
        "LOG_LEVEL": "debug",
    }


async def run(
    args: tuple[str, ...], env: dict[str, str], *, stop_after_s: float = 20.0
) -> tuple[int | None, str]:
    """Run ``orchestrix ARGS``; SIGTERM it after ``stop_after_s`` if it still runs.

    At most four at once: on two cores, more would still be importing when stopped.
    """
    async with _AT_ONCE:
        return await _run(args, env, stop_after_s)


_AT_ONCE = asyncio.Semaphore(4)


async def _run(
    args: tuple[str, ...], env: dict[str, str], stop_after_s: float
) -> tuple[int | None, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrix.cli",
        *args,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )
    return await stopped(process, stop_after_s)


async def stopped(process: asyncio.subprocess.Process, after_s: float) -> tuple[int | None, str]:
    """Its exit code and output, SIGTERMed if it still runs after ``after_s``."""
    assert process.stdout is not None
    # Read apart from the wait: a cancelled communicate() would lose what it read.
    reading = asyncio.create_task(process.stdout.read())
    try:
        await asyncio.wait_for(process.wait(), after_s)
    except TimeoutError:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 40)
    output = await reading
    return process.returncode, output.decode(errors="replace")


def command(service: str) -> tuple[str, ...]:
    return ("migrate", "up") if service == "migrate" else (service,)


def assert_clean(texts: dict[str, str], sentinels: tuple[str, ...]) -> None:
    for where, text in texts.items():
        for sentinel in sentinels:
            assert sentinel not in text, f"{where} shows a secret:\n{text[-3000:]}"


async def test_services_over_tls_with_credentials_print_no_secret(
    secure: Secure, tmp_path: Path
) -> None:
    name = f"orx_secrets_{secrets.token_hex(4)}"
    create_database(secure.postgres, name)
    system = System("", "", tmp_path, env=secure_env(secure, name))
    outputs: dict[str, str] = {}
    code, outputs["migrate"] = await run(("migrate", "up"), system.env)
    assert code == 0, outputs["migrate"]
    try:
        services = [system.start(role) for role in ("api", "scheduler", "worker")]
        for service in services:
            await system.ready(service, timeout_s=30)
        api = f"http://127.0.0.1:{services[0].port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{api}/api/v1/jobs", json={"type": "demo_job", "payload": {"n": 1}}
            ) as response:
                assert response.status == 201
                job = await response.json()
            async with http.get(f"{api}/api/v1/jobs/{job['id']}?wait=20s") as response:
                assert (await response.json())["state"] == "SUCCEEDED"
            for service in services:
                url = (
                    f"{api}/metrics"
                    if service.role == "api"
                    else f"http://127.0.0.1:{service.port}/metrics"
                )
                async with http.get(url) as response:
                    outputs[f"{service.role} /metrics"] = await response.text()
    finally:
        system.stop_all()
    for service in system.services:
        outputs[f"{service.role} log"] = service.log()
    # The processes did connect with the secrets: the job ran and was written.
    assert (
        'orchestrix_jobs_succeeded_total{queue="default",type="demo_job"} 1.0'
        in (outputs["worker /metrics"])
    )
    assert_clean(outputs, secure.sentinels)


SENTINEL = "SENTINEL-bad-config-9f3a"


@pytest.mark.parametrize(
    "env",
    [
        {"DATABASE_URL": f"mysql://orx:{SENTINEL}@db/orchestrix"},
        # A password pasted where the URL goes.
        {"DATABASE_URL": SENTINEL},
        {"DATABASE_URL": f"postgresql://orx:{SENTINEL}@db:port/orchestrix"},
        {"DATABASE_URL": f"postgresql://orx:{SENTINEL}@db/orchestrix?sslmode=on"},
        {"DATABASE_URL": f"postgresql://orx:{SENTINEL}@db/orchestrix", "DB_PASSWORD": "x"},
        {"NATS_URL": f"nats://orx:{SENTINEL}@nats:port"},
        {"NATS_URL": SENTINEL},
        {"NATS_URL": f"nats://{SENTINEL}@nats:4222", "NATS_TOKEN": "x"},
        {"NATS_TOKEN": SENTINEL, "NATS_TOKEN_FILE": "/nonexistent"},
        {"DB_PASSWORD": SENTINEL, "DB_SSLMODE": "verify-full"},
    ],
)
async def test_a_bad_configuration_is_named_without_its_secret(env: dict[str, str]) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DB_", "NATS_"))}
    results = await asyncio.gather(
        *(run(command(service), {**base, **env}) for service in SERVICES)
    )
    for service, (code, output) in zip(SERVICES, results, strict=True):
        assert code == 2, (service, output)
        assert "configuration error" in output, output
        assert SENTINEL not in output, (service, output)


async def test_unreachable_and_refusing_servers_are_reported_without_secrets(
    secure: Secure, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DB_", "NATS_"))}
    good = secure_env(secure, "postgres")
    wrong_db = tmp_path / "wrong-db"
    wrong_db.write_text(SENTINEL)
    cases = {
        "postgres unreachable": {
            **base,
            "DATABASE_URL": f"postgresql://orx:{SENTINEL}@127.0.0.1:{closed}/orchestrix",
            "NATS_URL": f"nats://orx:{SENTINEL}@127.0.0.1:{closed}",
        },
        "postgres refuses": {**base, **good, "DB_PASSWORD_FILE": str(wrong_db)},
        "nats refuses": {**base, **good, "NATS_PASSWORD": SENTINEL, "NATS_PASSWORD_FILE": ""},
    }
    runs = [
        (case, service, run(command(service), env, stop_after_s=10))
        for case, env in cases.items()
        for service in SERVICES
        if not (case == "nats refuses" and service == "migrate")  # no NATS there
    ]
    results = await asyncio.gather(*(job for _, _, job in runs))
    outputs: dict[str, str] = {}
    for (case, service, _), (code, output) in zip(runs, results, strict=True):
        outputs[f"{case}: {service}"] = output
        if case == "postgres refuses" or (case == "nats refuses" and service != "api"):
            # Refused: one clear line and exit 1, not a retry loop.
            assert code == 1, (case, service, output)
            said = "cannot connect to" if service == "migrate" else "refused the connection"
            assert said in output, (case, service, output)
    unreachable = outputs["postgres unreachable: worker"]
    assert "database not reachable; retrying" in unreachable
    assert_clean(outputs, (SENTINEL, *secure.sentinels))


async def test_help_shows_no_secret_from_the_environment(secure: Secure) -> None:
    env = {**os.environ, **secure_env(secure, "postgres"), "DB_PASSWORD_FILE": ""}
    env |= {"DB_PASSWORD": SENTINEL, "NATS_TOKEN": SENTINEL, "NATS_USER": ""}
    results = await asyncio.gather(
        *(run((service, "--help"), env) for service in (*SERVICES, "dev"))
    )
    for code, output in results:
        assert code == 0
        assert "environment variables:" in output
        assert SENTINEL not in output
