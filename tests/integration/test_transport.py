"""TLS and authentication towards PostgreSQL and NATS, against servers that demand them.

The servers (tests/secure_servers.py, the ``secure`` fixture) refuse plain
connections and unknown clients. Each test connects the way the services do:
settings from an environment, then the pool (asyncpg) and the migrations
(libpq through psycopg), or ``broker.connect``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from orchestrix import broker, migrate
from orchestrix.db.pool import connect_with_backoff, create_pool
from orchestrix.settings import DatabaseSettings, NatsSettings
from orchestrix.transport import Refused

from tests.conftest import Secure
from tests.secure_servers import APP_ROLE, CERT_ROLE, NATS_USER, create_database


def db_env(
    secure: Secure,
    *,
    mode: str = "verify-full",
    ca: Path | None = None,
    host: str = "localhost",
    database: str = "postgres",
    **extra: str,
) -> dict[str, str]:
    env = {
        "DB_HOST": host,
        "DB_PORT": str(secure.postgres.port),
        "DB_USER": APP_ROLE,
        "DB_NAME": database,
        "DB_PASSWORD_FILE": str(secure.secrets_dir / "db"),
        "DB_SSLMODE": mode,
        **extra,
    }
    if ca is not None:
        env["DB_SSLROOTCERT"] = str(ca)
    return env


async def encrypted(settings: DatabaseSettings) -> bool:
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        value: bool = await pool.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        return value
    finally:
        await pool.close()


async def test_verify_full_with_the_right_ca_migrates_and_connects(secure: Secure) -> None:
    name = f"orx_tls_{secrets.token_hex(4)}"
    create_database(secure.postgres, name)
    settings = DatabaseSettings.from_env(db_env(secure, ca=secure.pki.ca, database=name))
    # libpq (psycopg) runs the migrations, asyncpg the services: both over verify-full.
    await asyncio.to_thread(migrate.up, settings.url)
    assert await encrypted(settings)
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SELECT count(*) FROM jobs") == 0
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("mode", "ca", "host", "reason"),
    [
        # A CA that did not sign the server's certificate.
        ("verify-full", "other_ca", "localhost", "certificate verify failed"),
        # The right CA, but the certificate names localhost, not 127.0.0.1.
        ("verify-full", "ca", "127.0.0.1", "127.0.0.1"),
        # As libpq: require with a root certificate checks the chain (verify-ca).
        ("require", "other_ca", "localhost", "certificate verify failed"),
        ("verify-ca", "other_ca", "127.0.0.1", "certificate verify failed"),
    ],
)
async def test_a_server_that_does_not_verify_is_refused_by_both_drivers(
    secure: Secure, mode: str, ca: str, host: str, reason: str
) -> None:
    settings = DatabaseSettings.from_env(
        db_env(secure, mode=mode, ca=getattr(secure.pki, ca), host=host)
    )
    stop = asyncio.Event()
    started = time.monotonic()
    # Not waited out as an outage: the process stops at once with one clear line.
    with pytest.raises(Refused) as caught:
        await connect_with_backoff(settings, stop)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("PostgreSQL refused the connection: SSLCertVerificationError")
    assert reason in message
    with pytest.raises(migrate.ConnectError) as by_libpq:
        await asyncio.to_thread(migrate.up, settings.url)
    assert "certificate verify failed" in str(by_libpq.value) or (
        'does not match host name "127.0.0.1"' in str(by_libpq.value)
    )
    for text in (message, str(by_libpq.value)):
        assert secure.db_password not in text


async def test_verify_ca_checks_the_chain_only(secure: Secure) -> None:
    settings = DatabaseSettings.from_env(
        db_env(secure, mode="verify-ca", ca=secure.pki.ca, host="127.0.0.1")
    )
    assert await encrypted(settings)
    with psycopg.connect(settings.url) as conn:  # libpq, as the migrations connect
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)


async def test_without_tls_the_server_refuses_the_password_login(secure: Secure) -> None:
    settings = DatabaseSettings.from_env(db_env(secure, mode="disable"))
    with pytest.raises(Refused, match="no encryption") as caught:
        await connect_with_backoff(settings, asyncio.Event())
    assert secure.db_password not in str(caught.value)


async def test_a_wrong_password_is_refused_without_showing_it(
    secure: Secure, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("SENTINEL-wrong-password\n")
    env = db_env(secure, ca=secure.pki.ca, DB_PASSWORD_FILE=str(wrong))
    settings = DatabaseSettings.from_env(env)
    with pytest.raises(Refused, match="password authentication failed") as caught:
        await connect_with_backoff(settings, asyncio.Event())
    assert "SENTINEL" not in str(caught.value)
    with pytest.raises(migrate.ConnectError, match="password authentication failed") as by_libpq:
        await asyncio.to_thread(migrate.up, settings.url)
    assert "SENTINEL" not in str(by_libpq.value)


async def test_a_client_certificate_logs_in_without_a_password(secure: Secure) -> None:
    env = db_env(secure, ca=secure.pki.ca, DB_USER=CERT_ROLE)
    del env["DB_PASSWORD_FILE"]
    with_cert = {
        **env,
        "DB_SSLCERT": str(secure.pki.client_cert),
        "DB_SSLKEY": str(secure.pki.client_key),
    }
    assert await encrypted(DatabaseSettings.from_env(with_cert))
    with pytest.raises(Refused, match="certificate"):
        await create_pool(DatabaseSettings.from_env(env), min_size=1, max_size=1)


def nats_env(secure: Secure, server: Any, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": f"tls://localhost:{server.port}",
        "NATS_TLS_CA": str(secure.pki.ca),
        "NATS_TLS_CERT": str(secure.pki.client_cert),
        "NATS_TLS_KEY": str(secure.pki.client_key),
        **extra,
    }


async def round_trip(settings: NatsSettings) -> None:
    nc = await broker.connect(settings, "test-transport")
    try:
        sub = await nc.subscribe("orx.transport.echo", cb=None)

        async def echo() -> None:
            message = await sub.next_msg(timeout=5)
            await message.respond(message.data)

        responder = asyncio.create_task(echo())
        reply = await nc.request("orx.transport.echo", b"ping", timeout=5)
        await responder
        assert reply.data == b"ping"
    finally:
        await nc.close()


@pytest.mark.parametrize("method", ["password", "nkey", "token"])
async def test_nats_with_tls_and_each_kind_of_credentials(secure: Secure, method: str) -> None:
    if method == "password":
        env = nats_env(
            secure,
            secure.nats,
            NATS_USER=NATS_USER,
            NATS_PASSWORD_FILE=str(secure.secrets_dir / "nats"),
        )
    elif method == "nkey":
        env = nats_env(secure, secure.nats, NATS_NKEY_SEED=str(secure.nkey.seed_file))
    else:
        env = nats_env(secure, secure.nats_token, NATS_TOKEN_FILE=str(secure.secrets_dir / "token"))
    await round_trip(NatsSettings.from_env(env))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, "Authorization Violation"),
        ({"NATS_USER": NATS_USER, "NATS_PASSWORD": "SENTINEL-wrong"}, "Authorization Violation"),
        ({"NATS_TOKEN": "SENTINEL-wrong"}, "Authorization Violation"),
        # The server's certificate is not the other CA's.
        ({"NATS_TLS_CA": "other_ca", "NATS_TOKEN_FILE": "token"}, "certificate verify failed"),
        # The server asks every client for a certificate.
        ({"NATS_TLS_CERT": "", "NATS_TLS_KEY": "", "NATS_TOKEN_FILE": "token"}, "certificate"),
    ],
)
async def test_nats_refuses_wrong_or_missing_credentials_at_once(
    secure: Secure, change: dict[str, str], reason: str
) -> None:
    server = secure.nats_token if "NATS_TOKEN" in str(change) else secure.nats
    env = nats_env(secure, server, **change)
    if env.get("NATS_TLS_CA") == "other_ca":
        env["NATS_TLS_CA"] = str(secure.pki.other_ca)
    if env.get("NATS_TOKEN_FILE") == "token":
        env["NATS_TOKEN_FILE"] = str(secure.secrets_dir / "token")
    settings = NatsSettings.from_env(env)
    started = time.monotonic()
    with pytest.raises(Refused, match=reason) as caught:
        await broker.connect_with_backoff(settings, "test-transport", asyncio.Event())
    assert time.monotonic() - started < 5
    assert "SENTINEL" not in str(caught.value)


async def test_the_plain_test_server_is_unaffected(settings: Any) -> None:
    """No TLS, no credentials: the settings add nothing to the connection."""
    assert settings.nats.tls is None
    nc = await broker.connect(settings.nats, "test-transport-plain")
    await nc.close()
    conn = await asyncpg.connect(settings.database.url)
    await conn.close()
