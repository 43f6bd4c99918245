"""NATS_CREDS against a nats-server in operator (JWT) mode.

The server trusts an operator made here (tests/nats_jwt.py); the operator
signed one account, which signs its users. A process logs in with a creds file
(the user's JWT and NKey seed), the way ``nsc`` hands them out: the broker
connection the services use, and a real worker process. A user the account did
not sign, a creds file whose seed is not its JWT's, and a file that is not a
creds file at all are refused at once, with messages that show neither the JWT
nor the seed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nkeys
import pytest
from orchestrix import broker, handbacks
from orchestrix.devservers import EmbeddedNats
from orchestrix.settings import NatsSettings, SettingsError
from orchestrix.transport import Refused

from tests.conftest import free_port
from tests.e2e.test_secrets import stopped
from tests.integration.test_transport import round_trip
from tests.nats_jwt import Identity, Operator

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class JwtNats:
    server: EmbeddedNats
    operator: Operator
    folder: Path

    def env(self, creds: Path) -> dict[str, str]:
        return {"NATS_URL": self.server.url, "NATS_CREDS": str(creds)}


@pytest.fixture(scope="module")
def jwt_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtNats]:
    folder = tmp_path_factory.mktemp("nats-jwt")
    operator = Operator.make()
    config = folder / "nats.conf"
    config.write_text(operator.server_config())
    server = EmbeddedNats(folder / "server", config=config)
    server.start()
    try:
        yield JwtNats(server, operator, folder)
    finally:
        server.stop()


def secrets_of(creds: Path) -> tuple[str, str]:
    """The JWT and the seed in a creds file: what no message may show."""
    lines = creds.read_text().splitlines()
    jwt = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
    seed = lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1]
    return jwt, seed


async def test_a_creds_file_logs_in_and_the_account_has_jetstream(jwt_nats: JwtNats) -> None:
    creds = jwt_nats.operator.user_creds(jwt_nats.folder, "orx-good")
    settings = NatsSettings.from_env(jwt_nats.env(creds))
    assert settings.auth.method == "creds"
    await round_trip(settings)
    nc = await broker.connect(settings, "test-creds")
    try:
        # The hand-back ledger's stream, as the workers make it, in the user's account.
        js = nc.jetstream()
        await handbacks.ensure_stream(js, settings)
        info = await js.stream_info(handbacks.stream_name(settings))
        assert info.config.name == handbacks.stream_name(settings)
    finally:
        await nc.close()


@pytest.mark.parametrize("case", ["unknown account", "seed of another user"])
async def test_creds_the_server_does_not_trust_are_refused_at_once(
    jwt_nats: JwtNats, case: str
) -> None:
    operator = jwt_nats.operator
    if case == "unknown account":
        # A user signed by an account the operator never signed.
        stranger = Identity.make(nkeys.PREFIX_BYTE_ACCOUNT)
        creds = operator.user_creds(jwt_nats.folder, "orx-stranger", signer=stranger)
    else:
        # A good JWT, with the seed of another user: the nonce's signature fails.
        creds = operator.user_creds(jwt_nats.folder, "orx-mixed")
        _, other_seed = secrets_of(operator.user_creds(jwt_nats.folder, "orx-other"))
        text = creds.read_text().splitlines()
        text[text.index("-----BEGIN USER NKEY SEED-----") + 1] = other_seed
        creds.write_text("\n".join(text) + "\n")
    started = time.monotonic()
    with pytest.raises(Refused, match="Authorization Violation") as caught:
        await broker.connect_with_backoff(
            NatsSettings.from_env(jwt_nats.env(creds)), "test-creds", asyncio.Event()
        )
    assert time.monotonic() - started < 5, "a refusal is not waited out"
    message = str(caught.value)
    assert "credentials: creds" in message
    for secret in secrets_of(creds):
        assert secret not in message
        assert secret.split(".")[-1] not in message  # not even the JWT's signature


def test_a_missing_or_malformed_creds_file_is_refused_at_start(
    jwt_nats: JwtNats, tmp_path: Path
) -> None:
    good = jwt_nats.operator.user_creds(tmp_path, "orx-source")
    jwt, seed = secrets_of(good)
    no_seed = tmp_path / "no-seed.creds"
    no_seed.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n")
    no_jwt = tmp_path / "no-jwt.creds"
    no_jwt.write_text(f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
    a_seed = tmp_path / "user.nk"  # an NKey seed file given as NATS_CREDS
    a_seed.write_text(seed + "\n")
    cases = {
        tmp_path / "absent.creds": "cannot read",
        tmp_path: "is a directory",
        no_seed: "no user NKey seed",
        no_jwt: "no user JWT",
        a_seed: "no user JWT",
    }
    for path, problem in cases.items():
        with pytest.raises(SettingsError) as caught:
            NatsSettings.from_env(jwt_nats.env(path))
        message = str(caught.value)
        assert message.startswith("NATS_CREDS: "), message
        assert problem in message, message
        assert str(path) in message
        assert jwt not in message
        assert seed not in message


async def _start_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrix.cli",
        "worker",
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )


async def _ready(port: int, process: asyncio.subprocess.Process, deadline_s: float) -> bool:
    """Whether the worker's /ready (PostgreSQL and NATS connected) answers 200 in time."""
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and process.returncode is None:
            try:
                async with session.get(f"http://127.0.0.1:{port}/ready") as response:
                    if response.status == 200:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    return False


async def test_a_worker_runs_with_a_creds_file_and_stops_on_a_refused_one(
    jwt_nats: JwtNats, database: str
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DB_", "NATS_"))}
    good = jwt_nats.operator.user_creds(jwt_nats.folder, "orx-worker")
    port = free_port()
    env = {**base, "DATABASE_URL": database, **jwt_nats.env(good), "METRICS_PORT": str(port)}
    worker = await _start_worker(env)
    try:
        ready = await _ready(port, worker, 20)
    finally:
        code, output = await stopped(worker, 0)
    assert ready, f"the worker never became ready:\n{output[-3000:]}"
    assert code == 0, output[-3000:]
    stranger = Identity.make(nkeys.PREFIX_BYTE_ACCOUNT)
    bad = jwt_nats.operator.user_creds(jwt_nats.folder, "orx-bad-worker", signer=stranger)
    code, refused = await stopped(await _start_worker({**env, "NATS_CREDS": str(bad)}), 15)
    # One clear line and exit 1, not a retry loop.
    assert code == 1, refused
    assert "refused the connection" in refused, refused
    for secret in (*secrets_of(good), *secrets_of(bad)):
        assert secret not in output + refused
