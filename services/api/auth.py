"""Who may call the API: bearer API keys, the scope each route needs, and the limits.

A request carries ``Authorization: Bearer orx_<id>_<secret>`` (orchestrix.apikeys).
The middleware finds the route's scope in ``ROUTE_SCOPES`` (every route of the
app must be there; the tests check it, and a route missing from it needs
``admin``), then:

- no key, or a malformed, unknown, revoked or expired one: 401 with
  ``WWW-Authenticate: Bearer``; a key without the scope: 403 naming it;
- a client address past API_AUTH_FAILURES failures in its window: its failures
  answer 429 (Retry-After), and a key this process has not verified lately is no
  longer looked up for it, so a flood of made-up keys costs no queries;
- a key past its requests/s (or, on creates, jobs/s): 429 with Retry-After.

A key read from PostgreSQL is trusted for API_KEY_CACHE_TTL (2 s, at most 5 s)
in each process: a cached request costs a dictionary lookup and one SHA-256, no
round trip, and a revoked key stops working on every process within that time.
Limits and failure counts are per API process (the README says so).

With API_AUTH=off the middleware is not installed at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from orchestrix import apikeys
from orchestrix.apikeys import ADMIN, JOBS_CANCEL, JOBS_READ, JOBS_WRITE, METRICS_READ
from orchestrix.db import api_keys as db
from orchestrix.services.api.errors import ApiError
from orchestrix.services.api.keys import POOL
from orchestrix.settings import AuthSettings

OPEN = None

# The scope of every route (method, path template). HEAD is GET's.
ROUTE_SCOPES: dict[tuple[str, str], str | None] = {
    ("POST", "/api/v1/jobs"): JOBS_WRITE,
    ("POST", "/api/v1/jobs/batch"): JOBS_WRITE,
    ("GET", "/api/v1/jobs"): JOBS_READ,
    ("GET", "/api/v1/jobs/{id}"): JOBS_READ,
    ("DELETE", "/api/v1/jobs/{id}"): JOBS_CANCEL,
    ("POST", "/api/v1/jobs/{id}/retry"): JOBS_WRITE,
    ("POST", "/api/v1/jobs/{id}/run"): JOBS_WRITE,
    ("GET", "/api/v1/jobs/{id}/events"): JOBS_READ,
    ("GET", "/api/v1/events"): JOBS_READ,
    ("POST", "/api/v1/jobs/cancel"): ADMIN,
    ("POST", "/api/v1/jobs/retry"): ADMIN,
    ("GET", "/api/v1/stats"): JOBS_READ,
    ("GET", "/api/v1/queues"): JOBS_READ,
    ("GET", "/api/v1/queues/{queue}"): JOBS_READ,
    ("PATCH", "/api/v1/queues/{queue}"): ADMIN,
    ("POST", "/api/v1/queues/{queue}/pause"): ADMIN,
    ("POST", "/api/v1/queues/{queue}/resume"): ADMIN,
    ("POST", "/api/v1/workflows"): JOBS_WRITE,
    ("GET", "/api/v1/workflows/{id}"): JOBS_READ,
    ("DELETE", "/api/v1/workflows/{id}"): ADMIN,
    ("POST", "/api/v1/schedules"): ADMIN,
    ("GET", "/api/v1/schedules"): JOBS_READ,
    ("GET", "/api/v1/schedules/{name}"): JOBS_READ,
    ("PATCH", "/api/v1/schedules/{name}"): ADMIN,
    ("DELETE", "/api/v1/schedules/{name}"): ADMIN,
    ("POST", "/api/v1/rate-limits"): ADMIN,
    ("GET", "/api/v1/rate-limits"): JOBS_READ,
    ("GET", "/api/v1/rate-limits/{name}"): JOBS_READ,
    ("PATCH", "/api/v1/rate-limits/{name}"): ADMIN,
    ("DELETE", "/api/v1/rate-limits/{name}"): ADMIN,
    ("GET", "/health"): OPEN,
    ("GET", "/openapi.json"): OPEN,
    # Open unless API_READY_AUTH / API_METRICS_AUTH is on.
    ("GET", "/ready"): METRICS_READ,
    ("GET", "/metrics"): METRICS_READ,
}
_SWITCHABLE = {("GET", "/ready"): "open_ready", ("GET", "/metrics"): "open_metrics"}

# Bounds on what unknown clients can make a process remember.
CACHE_MAX = 10_000
ADDRESSES_MAX = 100_000


@dataclass(frozen=True)
class Caller:
    """The key a request came with, once verified."""

    id: str
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """How the jobs' history names it."""
        return f"key:{self.name}"


CALLER = web.RequestKey("caller", Caller)


def scope_of(method: str, path: str, settings: AuthSettings) -> str | None:
    """The scope a route needs (OPEN: none); a route not in the table needs admin."""
    operation = ("GET" if method == "HEAD" else method, path)
    flag = _SWITCHABLE.get(operation)
    if flag is not None and getattr(settings, flag):
        return OPEN
    return ROUTE_SCOPES.get(operation, ADMIN)


class Bucket:
    """A token bucket: ``rate`` a second, at most ``burst``; starts full."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, n: float, now: float) -> float:
        """Take ``n``: 0 when granted, else the seconds until it would be.

        A take larger than the burst is granted from a full bucket and leaves it
        in debt, so a batch bigger than the burst is slowed, never refused forever.
        """
        self._refill(now)
        needed = min(n, self.burst)
        if self.tokens >= needed:
            self.tokens -= n
            return 0.0
        return (needed - self.tokens) / self.rate

    def short(self, now: float) -> float:
        """Seconds until one token is back (0: there is one now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


def _bucket(
    rate: float | None, burst: int | None, default_rate: float, default_burst: int, now: float
) -> Bucket | None:
    """A key's bucket: its own rate and burst, else the settings'; None when unlimited (0)."""
    rate = default_rate if rate is None else rate
    return None if rate == 0 else Bucket(rate, default_burst if burst is None else burst, now)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


@dataclass
class _Limits:
    requests: Bucket | None
    jobs: Bucket | None


@dataclass(frozen=True)
class _Entry:
    """A key as read, and what each request needs of it, worked out once."""

    until: float  # monotonic
    key: db.ApiKey | None
    caller: Caller | None = None
    expires: float = math.inf  # time.time() from which it no longer works


def _unauthorized(message: str, *, invalid: bool) -> ApiError:
    challenge = 'Bearer realm="orchestrix"'
    if invalid:  # RFC 6750: a key was sent and is not good
        challenge += ', error="invalid_token"'
    return ApiError(401, message, {"WWW-Authenticate": challenge})


class Authenticator:
    """Verifies keys (cached briefly), counts failures per address, limits each key."""

    def __init__(self, pool: Any, settings: AuthSettings) -> None:
        self._pool = pool
        self.settings = settings
        self._cache: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Future[_Entry]] = {}
        self._failures: OrderedDict[str, Bucket] = OrderedDict()
        self._limits: dict[str, _Limits] = {}

    # --- keys -----------------------------------------------------------------

    async def verify(self, request: web.Request) -> Caller:
        address = request.remote or ""
        header = request.headers.get("Authorization")
        if header is None:
            raise _unauthorized(
                "this route needs an API key: send Authorization: Bearer <key>", invalid=False
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._failed(address, "the Authorization header must be: Bearer <key>")
        key_id = apikeys.key_id_of(token)
        if key_id is None:
            raise self._failed(address, "malformed API key")
        now = time.monotonic()
        entry = self._cache.get(key_id)
        if entry is None or entry.until <= now:
            wait = self._blocked_for(address, now)
            if wait:
                raise self._too_many(wait)
            entry = await self._load(key_id)
        key = entry.key
        if key is None or not apikeys.matches(token, key.secret_sha256):
            raise self._failed(address, "unknown API key")
        if key.revoked_at is not None:
            raise self._failed(address, f"API key {key.name} was revoked")
        if entry.expires <= time.time():
            raise self._failed(address, f"API key {key.name} has expired")
        assert entry.caller is not None  # set for every key found
        return entry.caller

    async def _load(self, key_id: str) -> _Entry:
        """The key from PostgreSQL, one query for all the requests that wait for it."""
        loading = self._loading.get(key_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._loading[key_id] = future
        try:
            key = await db.get(self._pool, key_id)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:  # the same error for every request that waited
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._loading[key_id]
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        until = time.monotonic() + self.settings.cache_ttl_s
        if key is None:
            entry = _Entry(until, None)
        else:
            expires = math.inf if key.expires_at is None else key.expires_at.timestamp()
            entry = _Entry(until, key, Caller(key.id, key.name, frozenset(key.scopes)), expires)
        self._cache[key_id] = entry
        future.set_result(entry)
        return entry

    # --- failures per client address -------------------------------------------

    def _failure_bucket(self, address: str, now: float) -> Bucket:
        bucket = self._failures.get(address)
        if bucket is None:
            if len(self._failures) >= ADDRESSES_MAX:
                self._forget_failures(now)
            s = self.settings
            bucket = Bucket(s.failures_max / s.failure_window_s, s.failures_max, now)
            self._failures[address] = bucket
        else:
            self._failures.move_to_end(address)
        return bucket

    def _forget_failures(self, now: float) -> None:
        """Drop the addresses whose budget is whole again; if that is not enough, the
        least recently seen half."""
        for address in [a for a, b in self._failures.items() if b.full(now)]:
            del self._failures[address]
        while len(self._failures) >= ADDRESSES_MAX // 2:
            self._failures.popitem(last=False)

    def _blocked_for(self, address: str, now: float) -> float:
        bucket = self._failures.get(address)
        return 0.0 if bucket is None else bucket.short(now)

    def _failed(self, address: str, message: str) -> ApiError:
        now = time.monotonic()
        bucket = self._failure_bucket(address, now)
        wait = bucket.short(now)
        if wait:
            return self._too_many(wait)
        bucket.take(1, now)
        return _unauthorized(message, invalid=True)

    @staticmethod
    def _too_many(wait_s: float) -> ApiError:
        return ApiError(
            429,
            "too many failed authentications from this address; retry later",
            _retry_after(wait_s),
        )

    # --- per-key limits --------------------------------------------------------

    def _limits_of(self, caller: Caller) -> _Limits:
        limits = self._limits.get(caller.id)
        if limits is None:
            entry = self._cache.get(caller.id)
            own = entry.key.limits if entry is not None and entry.key is not None else None
            own = own or db.KeyLimits()
            s = self.settings
            now = time.monotonic()
            limits = _Limits(
                _bucket(
                    own.requests_per_s, own.requests_burst, s.requests_per_s, s.requests_burst, now
                ),
                _bucket(own.jobs_per_s, own.jobs_burst, s.jobs_per_s, s.jobs_burst, now),
            )
            self._limits[caller.id] = limits
        return limits

    def charge_request(self, caller: Caller) -> None:
        bucket = self._limits_of(caller).requests
        if bucket is not None:
            wait = bucket.take(1, time.monotonic())
            if wait:
                raise ApiError(
                    429,
                    f"API key {caller.name} is over its {bucket.rate:g} requests/s; retry later",
                    _retry_after(wait),
                )

    def charge_jobs(self, caller: Caller, jobs: int) -> None:
        bucket = self._limits_of(caller).jobs
        if bucket is not None:
            wait = bucket.take(jobs, time.monotonic())
            if wait:
                raise ApiError(
                    429,
                    f"API key {caller.name} is over its {bucket.rate:g} jobs/s; retry later",
                    _retry_after(wait),
                )


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)


def middleware(authenticator: Authenticator) -> Middleware:
    settings = authenticator.settings
    # The app's routes live as long as it does: each one's scope is looked up once.
    scopes: dict[web.AbstractRoute, str | None] = {}

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        try:
            needed = scopes[route]
        except KeyError:
            resource = route.resource
            if resource is None:
                # No route matched: 404 or 405 (with Allow) for anyone. The routes
                # are no secret (/openapi.json lists them); what they hold is.
                needed = OPEN
            else:
                needed = scopes[route] = scope_of(route.method, resource.canonical, settings)
        if needed is OPEN:
            return await handler(request)
        caller = await authenticator.verify(request)
        if not apikeys.allows(caller.scopes, needed):
            raise ApiError(403, f"API key {caller.name} lacks the scope {needed} this route needs")
        authenticator.charge_request(caller)
        request[CALLER] = caller
        return await handler(request)

    return auth


def caller_of(request: web.Request) -> Caller | None:
    """The request's verified key; None with authentication off."""
    return request.get(CALLER)


def key_name(request: web.Request) -> str | None:
    """The name of the request's key; None with authentication off."""
    caller = request.get(CALLER)
    return None if caller is None else caller.name


def charge_jobs(request: web.Request, jobs: int) -> None:
    """Count ``jobs`` created against the request's key; 429 (raised) when over its jobs/s."""
    caller = request.get(CALLER)
    if caller is not None:
        request.app[AUTHENTICATOR].charge_jobs(caller, jobs)


# Names the request's key to the statements of one connection (db.events.REQUEST_KEY).
_NAME_KEY = "SELECT set_config('orchestrix.key', $1, false)"


@contextlib.asynccontextmanager
async def connection(request: web.Request) -> AsyncIterator[Any]:
    """A pooled connection whose writes name the request's key: in the jobs'
    ``cancelled_by_key`` / ``created_by_key`` and as ``key:<name>`` in their events."""
    async with request.app[POOL].acquire() as conn, _named(conn, request):
        yield conn


# How long a request waits for a spare connection before it goes on without.
SPARE_WAIT_S = 0.5


@contextlib.asynccontextmanager
async def spare_connection(request: web.Request) -> AsyncIterator[Any | None]:
    """Another connection like ``connection``'s, when the pool has one to spare;
    else None. A request that holds a connection never waits long for a second:
    requests that each held one and waited for another could hold the whole pool
    and wait for ever (a bulk action then writes on the one it has)."""
    pool = request.app[POOL]
    if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
        yield None
        return
    try:
        conn = await pool.acquire(timeout=SPARE_WAIT_S)
    except TimeoutError:
        yield None
        return
    try:
        async with _named(conn, request):
            yield conn
    finally:
        await pool.release(conn)


@contextlib.asynccontextmanager
async def _named(conn: Any, request: web.Request) -> AsyncIterator[None]:
    """Names the request's key on ``conn`` for as long as it is used.

    The pool does not reset sessions (db.pool), so the name is cleared before the
    connection goes back; a connection that cannot be cleared is closed instead.
    """
    caller = request.get(CALLER)
    if caller is None:
        yield
        return
    await conn.execute(_NAME_KEY, caller.name)
    try:
        yield
    finally:
        try:
            await conn.execute(_NAME_KEY, "")
        except BaseException:
            conn.terminate()
            raise
