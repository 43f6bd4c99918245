"""API keys over real HTTP against a real database: the authorization matrix (every
route of the app x every kind of caller), failures per address, per-key limits,
the revocation delay, and which key created and cancelled a job."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from orchestrix import apikeys, ids
from orchestrix.db import api_keys
from orchestrix.db import jobs as db
from orchestrix.models import NewJob
from orchestrix.services.api import auth
from orchestrix.services.api.app import build_app
from orchestrix.settings import AuthSettings, Settings

from tests.conftest import served

# A concrete path for each template: ids nobody has, names that are valid.
PATH_VALUES = {"{id}": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "{queue}": "default", "{name}": "nightly"}
BAD_SECRETS = {
    "not bearer": "Basic dXNlcjpwYXNz",
    "empty bearer": "Bearer ",
    "malformed": "Bearer orx_nonsense",
    "unknown id": f"Bearer orx_{ids.new_id()}_{'A' * 43}",
}


@dataclass
class Served:
    url: str
    http: aiohttp.ClientSession
    app: web.Application

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = token if " " in token else f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=10)
        async with self.http.request(
            method, self.url + path, headers=headers, timeout=timeout, **kwargs
        ) as response:
            body: Any = None
            if response.content_type == "application/json":
                body = orjson.loads(await response.read())
            return response.status, body, response


ServeApp = Callable[..., Any]


@pytest.fixture
async def serve_auth(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[ServeApp]:
    """Serve the API with auth on (and the given AuthSettings fields)."""
    stack: list[Any] = []

    async def start(**fields: Any) -> Served:
        auth_settings = dataclasses.replace(AuthSettings(), **fields)
        app = build_app(dataclasses.replace(settings, auth=auth_settings), pool)
        ctx = served(app)
        url = await ctx.__aenter__()
        stack.append(ctx)
        http = aiohttp.ClientSession()
        stack.append(http)
        return Served(url, http, app)

    yield start
    for item in reversed(stack):
        if isinstance(item, aiohttp.ClientSession):
            await item.close()
        else:
            await item.__aexit__(None, None, None)


async def make_key(pool: asyncpg.Pool, name: str, *scopes: str, **limits: Any) -> str:
    _, token = await api_keys.create(pool, name, scopes, limits=api_keys.KeyLimits(**limits))
    return token


def app_routes(app: web.Application) -> list[tuple[str, str]]:
    """(METHOD, template) of every route the app serves; HEAD is GET's."""
    routes = []
    for route in app.router.routes():
        assert route.resource is not None
        if route.method != "HEAD":
            routes.append((route.method, route.resource.canonical))
    return sorted(set(routes))


def concrete(template: str) -> str:
    for name, value in PATH_VALUES.items():
        template = template.replace(name, value)
    assert "{" not in template, template
    return template


R, W, C, M, A = (
    apikeys.JOBS_READ,
    apikeys.JOBS_WRITE,
    apikeys.JOBS_CANCEL,
    apikeys.METRICS_READ,
    apikeys.ADMIN,
)
# The policy, written out apart from the code's table (README "Authentication"):
# a new route fails test_every_route_has_its_expected_scope until it is added here.
EXPECTED: dict[tuple[str, str], str | None] = {
    ("POST", "/api/v1/jobs"): W,
    ("POST", "/api/v1/jobs/batch"): W,
    ("GET", "/api/v1/jobs"): R,
    ("GET", "/api/v1/jobs/{id}"): R,
    ("DELETE", "/api/v1/jobs/{id}"): C,
    ("POST", "/api/v1/jobs/{id}/retry"): W,
    ("POST", "/api/v1/jobs/{id}/run"): W,
    ("GET", "/api/v1/jobs/{id}/events"): R,
    ("GET", "/api/v1/events"): R,
    ("POST", "/api/v1/jobs/cancel"): A,
    ("POST", "/api/v1/jobs/retry"): A,
    ("GET", "/api/v1/stats"): R,
    ("GET", "/api/v1/queues"): R,
    ("GET", "/api/v1/queues/{queue}"): R,
    ("PATCH", "/api/v1/queues/{queue}"): A,
    ("POST", "/api/v1/queues/{queue}/pause"): A,
    ("POST", "/api/v1/queues/{queue}/resume"): A,
    ("POST", "/api/v1/workflows"): W,
    ("GET", "/api/v1/workflows/{id}"): R,
    ("DELETE", "/api/v1/workflows/{id}"): A,
    ("POST", "/api/v1/schedules"): A,
    ("GET", "/api/v1/schedules"): R,
    ("GET", "/api/v1/schedules/{name}"): R,
    ("PATCH", "/api/v1/schedules/{name}"): A,
    ("DELETE", "/api/v1/schedules/{name}"): A,
    ("POST", "/api/v1/rate-limits"): A,
    ("GET", "/api/v1/rate-limits"): R,
    ("GET", "/api/v1/rate-limits/{name}"): R,
    ("PATCH", "/api/v1/rate-limits/{name}"): A,
    ("DELETE", "/api/v1/rate-limits/{name}"): A,
    ("GET", "/health"): None,
    ("GET", "/openapi.json"): None,
    ("GET", "/ready"): M,  # when protected; open by default
    ("GET", "/metrics"): M,
}


def expected_scope(method: str, template: str, protect_probes: bool) -> str | None:
    if template in ("/ready", "/metrics") and not protect_probes:
        return None
    return EXPECTED[(method, template)]


async def test_every_route_has_its_expected_scope(serve_auth: ServeApp) -> None:
    api = await serve_auth()
    assert set(app_routes(api.app)) == set(EXPECTED)
    assert auth.ROUTE_SCOPES == EXPECTED


@dataclass(frozen=True)
class Callers:
    scoped: dict[str, str]  # scope -> a key with only it
    revoked: str
    expired: str
    wrong_secret: str


async def callers(pool: asyncpg.Pool) -> Callers:
    scoped = {
        scope: await make_key(pool, scope.replace(":", "-"), scope) for scope in apikeys.SCOPES
    }
    revoked = await make_key(pool, "revoked", apikeys.ADMIN)
    await api_keys.revoke(pool, "revoked")
    expired = await make_key(pool, "expired", apikeys.ADMIN)
    await pool.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 s' WHERE name = 'expired'"
    )
    admin = scoped[apikeys.ADMIN]
    wrong_secret = admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")
    return Callers(scoped, revoked, expired, wrong_secret)


@pytest.mark.parametrize("protect_probes", [False, True], ids=["probes-open", "probes-protected"])
async def test_authorization_matrix(
    serve_auth: ServeApp, pool: asyncpg.Pool, protect_probes: bool
) -> None:
    """Every route x {no key, bad keys, revoked, expired, each scope, admin}."""
    # No failure limit here: the matrix fails on purpose hundreds of times.
    api = await serve_auth(
        failures_max=1_000_000, open_ready=not protect_probes, open_metrics=not protect_probes
    )
    settings = api.app[auth.AUTHENTICATOR].settings
    who = await callers(pool)
    checked = 0
    for method, template in app_routes(api.app):
        path = concrete(template)
        needed = expected_scope(method, template, protect_probes)
        assert auth.scope_of(method, template, settings) == needed
        kwargs: dict[str, Any] = {"json": {}} if method in ("POST", "PATCH") else {}
        where = f"{method} {template}"

        async def status_of(
            token: str | None, method: str = method, path: str = path, kwargs: Any = kwargs
        ) -> tuple[int, Any, aiohttp.ClientResponse]:
            answer: tuple[int, Any, aiohttp.ClientResponse] = await api.call(
                method, path, token, **kwargs
            )
            return answer

        if needed is None:  # open: nobody is turned away by auth
            for token in (None, *BAD_SECRETS.values(), who.revoked, who.expired):
                status, _, _ = await status_of(token)
                assert status not in (401, 403, 429), (where, token, status)
                checked += 1
            continue

        status, body, response = await status_of(None)
        assert status == 401, (where, status, body)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "API key" in body["error"]
        for label, token in [
            *BAD_SECRETS.items(),
            ("wrong secret", who.wrong_secret),
            ("revoked", who.revoked),
            ("expired", who.expired),
        ]:
            status, body, response = await status_of(token)
            assert status == 401, (where, label, status, body)
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], label
            assert isinstance(body["error"], str)
            checked += 1
        for scope, token in who.scoped.items():
            status, body, _ = await status_of(token)
            if apikeys.allows(frozenset({scope}), needed):
                assert status not in (401, 403, 429), (where, scope, status, body)
            else:
                assert status == 403, (where, scope, status, body)
                assert needed in body["error"], body
            checked += 1
    assert checked > 200


async def test_unknown_paths_and_methods_answer_404_and_405_to_anyone(
    serve_auth: ServeApp,
) -> None:
    """The routes are in /openapi.json for all to read: a wrong one says so, without a key."""
    api = await serve_auth()
    assert (await api.call("GET", "/api/v1/nothing"))[0] == 404
    status, body, response = await api.call("PUT", "/api/v1/jobs")
    assert status == 405, body
    assert "POST" in response.headers["Allow"]
    assert (await api.call("TRACE", "/health"))[0] == 405


async def test_repeated_failures_from_one_address_answer_429(
    serve_auth: ServeApp, pool: asyncpg.Pool
) -> None:
    api = await serve_auth(failures_max=3, failure_window_s=60)
    cached = await make_key(pool, "cached", apikeys.JOBS_READ)
    other = await make_key(pool, "other", apikeys.JOBS_READ)
    assert (await api.call("GET", "/api/v1/stats", cached))[0] == 200  # now in the cache
    for _ in range(3):
        assert (await api.call("GET", "/api/v1/stats", BAD_SECRETS["unknown id"]))[0] == 401
    status, body, response = await api.call("GET", "/api/v1/stats", BAD_SECRETS["malformed"])
    assert status == 429, body
    assert int(response.headers["Retry-After"]) >= 1
    assert "failed authentications" in body["error"]
    # Made-up keys are no longer looked up: no query, 429 at once.
    assert (await api.call("GET", "/api/v1/stats", BAD_SECRETS["unknown id"]))[0] == 429
    # A key this process verified lately still works; one it would have to look up waits.
    assert (await api.call("GET", "/api/v1/stats", cached))[0] == 200
    assert (await api.call("GET", "/api/v1/stats", other))[0] == 429
    # No key at all is not a failed guess: still 401.
    assert (await api.call("GET", "/api/v1/stats"))[0] == 401


async def test_a_key_over_its_requests_per_second_gets_429_with_retry_after(
    serve_auth: ServeApp, pool: asyncpg.Pool
) -> None:
    api = await serve_auth()
    slow = await make_key(pool, "slow", apikeys.JOBS_READ, requests_per_s=0.5, requests_burst=2)
    free = await make_key(pool, "free", apikeys.JOBS_READ, requests_per_s=0)
    assert (await api.call("GET", "/api/v1/stats", slow))[0] == 200
    assert (await api.call("GET", "/api/v1/stats", slow))[0] == 200
    status, body, response = await api.call("GET", "/api/v1/stats", slow)
    assert status == 429, body
    assert "requests/s" in body["error"]
    assert "slow" in body["error"]
    assert 1 <= int(response.headers["Retry-After"]) <= 2
    for _ in range(50):  # unlimited
        assert (await api.call("GET", "/api/v1/stats", free))[0] == 200


async def test_the_settings_limit_keys_without_their_own(
    serve_auth: ServeApp, pool: asyncpg.Pool
) -> None:
    api = await serve_auth(requests_per_s=1, requests_burst=1)
    key = await make_key(pool, "plain", apikeys.JOBS_READ)
    assert (await api.call("GET", "/api/v1/stats", key))[0] == 200
    assert (await api.call("GET", "/api/v1/stats", key))[0] == 429


async def test_a_key_over_its_jobs_per_second_gets_429_and_creates_nothing(
    serve_auth: ServeApp, pool: asyncpg.Pool
) -> None:
    api = await serve_auth()
    key = await make_key(pool, "batcher", apikeys.JOBS_WRITE, jobs_per_s=1, jobs_burst=5)
    jobs = {"jobs": [{"type": "t"}] * 5}
    assert (await api.call("POST", "/api/v1/jobs/batch", key, json=jobs))[0] == 201
    status, body, response = await api.call("POST", "/api/v1/jobs", key, json={"type": "t"})
    assert status == 429, body
    assert "jobs/s" in body["error"]
    assert int(response.headers["Retry-After"]) >= 1
    workflow = {"jobs": [{"key": "a", "type": "t"}]}
    assert (await api.call("POST", "/api/v1/workflows", key, json=workflow))[0] == 429
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 5


async def test_a_revoked_key_stops_working_within_the_cache_ttl(
    serve_auth: ServeApp, pool: asyncpg.Pool
) -> None:
    api = await serve_auth(cache_ttl_s=1.0)
    key = await make_key(pool, "soon-revoked", apikeys.JOBS_READ)
    assert (await api.call("GET", "/api/v1/stats", key))[0] == 200
    await api_keys.revoke(pool, "soon-revoked")
    revoked_at = time.monotonic()
    while (await api.call("GET", "/api/v1/stats", key))[0] == 200:
        assert time.monotonic() - revoked_at < 5
        await asyncio.sleep(0.05)
    status, body, _ = await api.call("GET", "/api/v1/stats", key)
    assert status == 401
    assert "revoked" in body["error"]
    # Cached requests cost no query: within the TTL, the key was served from memory.
    assert time.monotonic() - revoked_at >= 0.5


async def test_jobs_name_the_keys_that_created_and_cancelled_them(
    serve_auth: ServeApp, pool: asyncpg.Pool
) -> None:
    api = await serve_auth()
    writer = await make_key(pool, "writer", apikeys.JOBS_WRITE, apikeys.JOBS_READ)
    canceller = await make_key(pool, "canceller", apikeys.JOBS_CANCEL)
    admin = await make_key(pool, "boss", apikeys.ADMIN)

    status, job, _ = await api.call("POST", "/api/v1/jobs", writer, json={"type": "t"})
    assert status == 201
    assert job["created_by_key"] == "writer"
    assert job["cancelled_by_key"] is None
    status, cancelled, _ = await api.call("DELETE", f"/api/v1/jobs/{job['id']}", canceller)
    assert status == 200
    assert cancelled["cancelled_by_key"] == "canceller"
    status, shown, _ = await api.call("GET", f"/api/v1/jobs/{job['id']}", writer)
    assert (shown["created_by_key"], shown["cancelled_by_key"]) == ("writer", "canceller")
    actors = [
        r["actor"]
        for r in await pool.fetch(
            "SELECT actor FROM job_events WHERE job_id = $1 ORDER BY id", job["id"]
        )
    ]
    assert actors == ["key:writer", "key:canceller"]

    # A batch, and a running job whose worker is asked to stop (202).
    status, batch, _ = await api.call(
        "POST", "/api/v1/jobs/batch", writer, json={"jobs": [{"type": "r"}, {"type": "t"}]}
    )
    assert status == 201
    assert {j["created_by_key"] for j in batch["jobs"]} == {"writer"}
    [running] = await db.claim(pool, worker_id="w1", queues=None, types=["r"], limit=1, lease_s=30)
    status, asked, _ = await api.call("DELETE", f"/api/v1/jobs/{running.id}", canceller)
    assert status == 202
    assert asked["cancelled_by_key"] == "canceller"
    # The first request to cancel is the one recorded.
    await api.call("DELETE", f"/api/v1/jobs/{running.id}", admin)
    assert (await db.get(pool, running.id)).cancelled_by_key == "canceller"  # type: ignore[union-attr]

    # Bulk cancel and a workflow, by the admin key.
    status, _, _ = await api.call("POST", "/api/v1/jobs/cancel", admin, json={"type": "t"})
    assert status == 200
    other = batch["jobs"][1]["id"]
    assert (await db.get(pool, other)).cancelled_by_key == "boss"  # type: ignore[union-attr]
    workflow = {"jobs": [{"key": "a", "type": "t"}, {"key": "b", "type": "t", "depends_on": ["a"]}]}
    status, created, _ = await api.call("POST", "/api/v1/workflows", writer, json=workflow)
    assert status == 201
    assert {j["created_by_key"] for j in created["jobs"]} == {"writer"}
    status, _, _ = await api.call("DELETE", f"/api/v1/workflows/{created['id']}", admin)
    assert status == 200
    rows = await pool.fetch(
        "SELECT j.cancelled_by_key, e.actor FROM jobs j JOIN job_events e ON e.job_id = j.id"
        " WHERE j.workflow_id = $1 AND e.to_state = 'CANCELLED'",
        created["id"],
    )
    assert [(r["cancelled_by_key"], r["actor"]) for r in rows] == [("boss", "key:boss")] * 2

    # The key's name does not stick to the pooled connection: a write without a
    # key names the session again.
    plain, _ = await db.insert(pool, NewJob(type="t"))
    assert plain.created_by_key is None
    cancelled_plain = await db.cancel(pool, plain.id)
    assert cancelled_plain is not None
    assert cancelled_plain.cancelled_by_key is None
    actors = [
        r["actor"]
        for r in await pool.fetch("SELECT actor FROM job_events WHERE job_id = $1", plain.id)
    ]
    assert not any(a and a.startswith("key:") for a in actors), actors


async def test_with_auth_off_nothing_is_asked_and_jobs_name_no_key(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    assert not settings.auth.enabled
    app = build_app(settings, pool)
    async with served(app) as url, aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/jobs", json={"type": "t"}) as response:
            assert response.status == 201
            job = await response.json()
        async with http.delete(f"{url}/api/v1/jobs/{job['id']}") as response:
            assert response.status == 200
            cancelled = await response.json()
    assert job["created_by_key"] is None
    assert cancelled["cancelled_by_key"] is None


def test_secrets_are_long_random_and_only_their_digest_is_kept() -> None:
    key_id, token, digest = apikeys.new_key()
    assert re.fullmatch(r"orx_[0-7][0-9A-HJKMNP-TV-Z]{25}_[A-Za-z0-9_-]{43}", token)
    assert apikeys.key_id_of(token) == key_id
    assert apikeys.matches(token, digest)
    assert not apikeys.matches(token[:-1] + ("A" if token[-1] != "A" else "B"), digest)
    assert len(digest) == 32
    assert token.encode() not in digest
    assert apikeys.new_key()[1] != token
    for bad in ("", "orx_", token + "x", token.replace("orx_", "abc_"), f"orx_{key_id}"):
        assert apikeys.key_id_of(bad) is None


def test_scopes_are_checked() -> None:
    assert apikeys.parse_scopes("jobs:read, jobs:write,jobs:read") == ("jobs:read", "jobs:write")
    with pytest.raises(ValueError, match="unknown scope 'jobs:delete'"):
        apikeys.parse_scopes("jobs:read,jobs:delete")
    with pytest.raises(ValueError, match="at least one"):
        apikeys.parse_scopes(" , ")
    assert apikeys.allows(frozenset({"admin"}), "jobs:cancel")
    assert not apikeys.allows(frozenset({"jobs:read"}), "jobs:cancel")


async def test_the_document_says_what_this_server_asks_for(
    serve_auth: ServeApp, pool: asyncpg.Pool, settings: Settings
) -> None:
    from openapi_spec_validator import validate as validate_spec

    api = await serve_auth(open_metrics=False)
    status, document, _ = await api.call("GET", "/openapi.json")
    assert status == 200
    validate_spec(document)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]
    paths = document["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            needed = expected_scope(method.upper(), path, protect_probes=path == "/metrics")
            assert operation["x-required-scope"] == EXPECTED[(method.upper(), path)]
            if needed is None:
                assert operation["security"] == [], (method, path)
                assert "401" not in operation["responses"]
            else:
                assert operation["security"] == [{"bearer": []}], (method, path)
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)
                assert needed in operation["description"]
    assert paths["/ready"]["get"]["security"] == []  # open by default
    headers = paths["/api/v1/jobs"]["post"]["responses"]["401"]["headers"]
    assert headers["WWW-Authenticate"]["required"]

    # With auth off, nothing is required: a client must not expect a 401.
    app = build_app(settings, pool)
    async with (
        served(app) as url,
        aiohttp.ClientSession() as http,
        http.get(f"{url}/openapi.json") as response,
    ):
        off = await response.json()
    assert off["security"] == []
    assert all(
        operation["security"] == []
        for item in off["paths"].values()
        for method, operation in item.items()
        if method != "parameters"
    )
    assert "Authentication is off on this server" in off["info"]["description"]
