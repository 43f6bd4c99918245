"""``orchestrix keys`` as an operator runs it, against a running API process with auth on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import REPO

pytestmark = pytest.mark.timeout(120)


async def orchestrix(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "orchestrix.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=60,
        check=False,
    )


async def test_keys_create_list_revoke_on_a_running_api(make_system: SystemFactory) -> None:
    system = make_system(API_AUTH="on", API_KEY_CACHE_TTL="2s")
    api = system.start("api")
    await system.ready(api)  # /ready is open by default
    db = {"DATABASE_URL": system.database_url}
    url = f"http://127.0.0.1:{api.port}"

    created = await orchestrix(
        "keys",
        "create",
        "--name",
        "ci-bot",
        "--scopes",
        "jobs:read,jobs:write",
        "--expires",
        "90d",
        **db,
    )
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert len(lines) == 1  # the secret alone, for KEY=$(orchestrix keys create ...)
    secret = lines[0]
    assert secret.startswith("orx_")
    assert secret not in created.stderr
    assert "ci-bot" in created.stderr
    assert "shown this once" in created.stderr

    listed = await orchestrix("keys", "list", **db)
    assert listed.returncode == 0, listed.stderr
    assert "ci-bot" in listed.stdout
    assert "jobs:read,jobs:write" in listed.stdout
    assert "active" in listed.stdout
    random_part = secret.rsplit("_", 1)[1]
    assert random_part not in listed.stdout + listed.stderr
    as_json = await orchestrix("keys", "list", "--json", **db)
    # Other tests of the session may have left keys in its database.
    [key] = [k for k in orjson.loads(as_json.stdout) if k["name"] == "ci-bot"]
    assert key["name"] == "ci-bot"
    assert key["expires_at"] is not None
    assert random_part not in as_json.stdout
    assert set(key) == {
        "id", "name", "scopes", "created_at", "expires_at", "revoked_at",
        "requests_per_s", "requests_burst", "jobs_per_s", "jobs_burst",
    }  # fmt: skip

    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/jobs", json={"type": "t"}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.post(f"{url}/api/v1/jobs", json={"type": "t"}, headers=headers) as r:
            assert r.status == 201
            assert (await r.json())["created_by_key"] == "ci-bot"
        async with http.post(f"{url}/api/v1/jobs/cancel", json={"type": "t"}, headers=headers) as r:
            assert r.status == 403
            assert "admin" in (await r.json())["error"]

        revoked = await orchestrix("keys", "revoke", "ci-bot", **db)
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked API key ci-bot" in revoked.stdout
        started = time.monotonic()
        while True:
            async with http.get(f"{url}/api/v1/stats", headers=headers) as response:
                if response.status == 401:
                    break
                assert response.status == 200
            assert time.monotonic() - started < 5, "a revoked key still worked after 5 s"
            await asyncio.sleep(0.1)

    listed = await orchestrix("keys", "list", **db)
    assert "revoked" in listed.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "x", "--scopes", "jobs:delete"], "unknown scope 'jobs:delete'"),
        (["--name", "bad name", "--scopes", "admin"], "--name must match"),
        (["--name", "x", "--scopes", "admin", "--expires", "soon"], "--expires must be"),
        (["--name", "x", "--scopes", "admin", "--jobs-per-s", "-1"], "--jobs-per-s must be"),
    ],
)
async def test_keys_create_refuses_bad_input_in_one_line(
    database: str, args: list[str], message: str
) -> None:
    result = await orchestrix("keys", "create", *args, DATABASE_URL=database)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


async def test_a_key_name_is_never_reused(database: str) -> None:
    name = f"once-{os.getpid()}"
    first = await orchestrix(
        "keys", "create", "--name", name, "--scopes", "admin", DATABASE_URL=database
    )
    assert first.returncode == 0, first.stderr
    assert (await orchestrix("keys", "revoke", name, DATABASE_URL=database)).returncode == 0
    again = await orchestrix(
        "keys", "create", "--name", name, "--scopes", "admin", DATABASE_URL=database
    )
    assert again.returncode == 2
    assert f"a key named {name!r} exists" in again.stderr
    missing = await orchestrix("keys", "revoke", "no-such-key", DATABASE_URL=database)
    assert missing.returncode == 2
    assert "no key has the name or id 'no-such-key'" in missing.stderr


async def test_an_api_without_auth_refuses_a_remote_address(database: str) -> None:
    env = {"DATABASE_URL": database, "API_AUTH": "off", "API_HOST": "0.0.0.0"}
    result = await orchestrix("api", **env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "API_AUTH: is off, and API_HOST '0.0.0.0' is not a loopback address" in line
    assert "API_ALLOW_UNAUTHENTICATED_REMOTE=true" in line
