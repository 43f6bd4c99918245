"""Typed configuration: the only module that reads the environment.

Each concern is a frozen dataclass built by ``from_env(env)``; a service asks for
the ones it needs. A bad value raises :class:`SettingsError` at start with one
line naming the variable and what is wrong with it, so a misconfigured container
dies at once instead of misbehaving later.

Durations accept plain seconds (``1.5``) or a unit suffix (``500ms``, ``2s``,
``5m``, ``1h``, ``7d``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def duration_seconds(text: str) -> float | None:
    """``text`` as seconds (``1.5``, ``500ms``, ``2s``, ``5m``, ``1h``, ``7d``); None if
    it is not a duration."""
    match = _DURATION.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


class SettingsError(ValueError):
    """A configuration variable has a value the process cannot run with."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def _span(seconds: float) -> str:
    """A duration bound as an error shows it: seconds, or days once that is clearer."""
    if seconds >= 1e6:
        return f"{seconds / 86400:g}d"
    return f"{seconds:g}s"


class _Reader:
    """Typed getters over an environment mapping; every error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(name, f"must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise SettingsError(name, f"must be between {low} and {high}, got {number}")
        return number

    def seconds(self, name: str, default: float, *, low: float, high: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        number = duration_seconds(value)
        if number is None:
            raise SettingsError(
                name, f"must be a duration such as 1.5, 500ms, 2s, 5m, 1h or 7d, got {value!r}"
            )
        if not low <= number <= high:
            raise SettingsError(
                name, f"must be between {_span(low)} and {_span(high)}, got {value!r}"
            )
        return number

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(name, f"must be a number, got {value!r}") from None
        if not low <= number <= high:
            raise SettingsError(name, f"must be between {low:g} and {high:g}, got {value!r}")
        return number

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise SettingsError(name, f"must be true or false (or on / off), got {value!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise SettingsError(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if not value.startswith(tuple(f"{scheme}://" for scheme in schemes)):
            wanted = " or ".join(f"{scheme}://" for scheme in schemes)
            raise SettingsError(name, f"must start with {wanted}, got {redact(value)!r}")
        return value


def redact(url: str) -> str:
    """``url`` with its password (or a NATS token: a user part alone) shown as ``***``.

    For error messages, which end up in logs: works on text that does not parse
    as a URL too, taking everything before the last ``@`` as the credentials.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user + ':***' if colon else '***'}@{host}"


def nats_servers(value: str) -> tuple[str, ...]:
    """The servers of a ``NATS_URL`` value: one URL, or several separated by commas.

    Each must be ``nats://`` or ``tls://``, then ``[user[:password]@]host[:port]``.
    A bad entry raises SettingsError naming NATS_URL, the entry's place and the
    entry itself with its credentials hidden.
    """
    entries = [entry.strip() for entry in value.split(",")]
    servers = []
    for number, entry in enumerate(entries, 1):
        where = f"entry {number} of {len(entries)}" if len(entries) > 1 else "the URL"
        problem = _nats_url_problem(entry)
        if problem is not None:
            raise SettingsError("NATS_URL", f"{where} {problem}, got {redact(entry)!r}")
        servers.append(entry)
    return tuple(servers)


def _nats_url_problem(entry: str) -> str | None:
    if not entry:
        return "is empty (separate URLs with single commas)"
    if not entry.startswith(("nats://", "tls://")):
        return "must start with nats:// or tls://"
    if any(char.isspace() for char in entry):
        return "holds a space (separate URLs with commas)"
    parts = urlsplit(entry)
    try:
        port_ok = parts.port != 0
    except ValueError:  # not a number, or above 65535
        port_ok = False
    if not port_ok:
        return "has a port that is not a number from 1 to 65535"
    if not parts.hostname:
        return "has no host"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be only scheme://[user[:password]@]host[:port]"
    return None


@dataclass(frozen=True)
class DatabaseSettings:
    """Where PostgreSQL is. ``DATABASE_URL`` wins over the ``DB_*`` parts."""

    url: str
    pool_min_size: int = 1
    pool_max_size: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DatabaseSettings:
        read = _Reader(env)
        url = read.raw("DATABASE_URL")
        if url is not None:
            url = read.url("DATABASE_URL", "", ("postgresql", "postgres"))
        else:
            host = read.text("DB_HOST", "localhost")
            port = read.integer("DB_PORT", 5432, low=1, high=65535)
            user = read.text("DB_USER", "orchestrix")
            password = read.raw("DB_PASSWORD")
            name = read.text("DB_NAME", "orchestrix")
            sslmode = read.choice("DB_SSLMODE", "disable", SSL_MODES)
            auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
            url = f"postgresql://{auth}@{host}:{port}/{quote(name, safe='')}?sslmode={sslmode}"
        pool_max = read.integer("DB_POOL_MAX_SIZE", 10, low=1, high=1000)
        pool_min = read.integer("DB_POOL_MIN_SIZE", min(1, pool_max), low=0, high=pool_max)
        return cls(url=url, pool_min_size=pool_min, pool_max_size=pool_max)


_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class NatsSettings:
    """Where NATS is, and the subjects Orchestrix uses on it.

    NATS carries signals, never the record: wake-ups for workers with free
    slots, cancel requests, and the lifeline's question to a worker that seems
    dead. PostgreSQL holds every job. ``servers`` are the URLs of ``NATS_URL``:
    one server, or the nodes of a cluster, any of which a process connects and
    reconnects to. One JetStream stream holds the hand-back ledger
    (``orchestrix.handbacks``), in ``stream_replicas`` copies: 3 on a three-node
    cluster, so that it outlives a node.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    subject_prefix: str = "orchestrix.jobs"
    stream_replicas: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NatsSettings:
        read = _Reader(env)
        prefix = read.text("NATS_SUBJECT_PREFIX", cls.subject_prefix)
        if not all(_TOKEN.match(token) for token in prefix.split(".")):
            raise SettingsError(
                "NATS_SUBJECT_PREFIX", "must be dot-separated tokens of letters, digits, '_', '-'"
            )
        return cls(
            servers=nats_servers(read.text("NATS_URL", ",".join(cls.servers))),
            subject_prefix=prefix,
            # JetStream allows at most 5.
            stream_replicas=read.integer(
                "NATS_STREAM_REPLICAS", cls.stream_replicas, low=1, high=5
            ),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker process takes jobs, runs them, retries them and stops.

    ``queues`` None means every queue.
    """

    concurrency: int = 100
    shutdown_timeout_s: float = 30.0
    executors: tuple[str, ...] = ()
    queues: tuple[str, ...] | None = None
    poll_interval_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        read = _Reader(env)
        modules = tuple(
            m.strip() for m in read.text("ORCHESTRIX_EXECUTORS", "").split(",") if m.strip()
        )
        for module in modules:
            if not all(part.isidentifier() for part in module.split(".")):
                raise SettingsError("ORCHESTRIX_EXECUTORS", f"{module!r} is not an import path")
        queues: tuple[str, ...] | None = None
        listed = read.raw("WORKER_QUEUES")
        if listed is not None and listed != "*":
            queues = tuple(dict.fromkeys(q.strip() for q in listed.split(",") if q.strip()))
            if not queues:
                raise SettingsError("WORKER_QUEUES", "must name at least one queue, or be *")
            for queue in queues:
                if len(queue) > 64:
                    raise SettingsError("WORKER_QUEUES", f"{queue[:20]!r}... is over 64 characters")
        return cls(
            concurrency=read.integer("WORKER_CONCURRENCY", cls.concurrency, low=1, high=10_000),
            shutdown_timeout_s=read.seconds(
                "SHUTDOWN_TIMEOUT", cls.shutdown_timeout_s, low=0, high=86400
            ),
            executors=modules,
            queues=queues,
            poll_interval_s=read.seconds(
                "WORKER_POLL_INTERVAL", cls.poll_interval_s, low=0.01, high=3600
            ),
        )


@dataclass(frozen=True)
class RetrySettings:
    """The backoff before a job's next attempt: ``base_delay_s`` doubled per attempt,
    at most ``max_delay_s``. Read by the worker's completer (a failed attempt) and
    the scheduler's rescuer (a lost one), so both back off alike.
    """

    base_delay_s: float = 1.0
    max_delay_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RetrySettings:
        read = _Reader(env)
        base = read.seconds("RETRY_BASE_DELAY", cls.base_delay_s, low=0.001, high=86400)
        most = read.seconds("RETRY_MAX_DELAY", cls.max_delay_s, low=0.001, high=7 * 86400)
        if most < base:
            raise SettingsError("RETRY_MAX_DELAY", f"must be at least RETRY_BASE_DELAY ({base:g}s)")
        return cls(base_delay_s=base, max_delay_s=most)


@dataclass(frozen=True)
class RecoverySettings:
    """How jobs whose owner vanished are found and taken back.

    A worker renews the lease of each job it runs every third of
    ``lease_timeout_s`` and stops a job whose lease it could not renew before
    the lease runs out; the rescuer takes the job back once it has. A worker
    whose process died is noticed sooner, by the lifeline (its PostgreSQL
    session and its NATS connection are both gone).
    """

    lease_timeout_s: float = 30.0
    maintenance_interval_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RecoverySettings:
        read = _Reader(env)
        return cls(
            # Renewed every third of it on a heartbeat that beats every half
            # second (orchestrix.liveness.BEAT_S): a shorter lease would run out
            # between two beats' renewals.
            lease_timeout_s=read.seconds("LEASE_TIMEOUT", cls.lease_timeout_s, low=2, high=3600),
            maintenance_interval_s=read.seconds(
                "MAINTENANCE_INTERVAL", cls.maintenance_interval_s, low=0.05, high=3600
            ),
        )


@dataclass(frozen=True)
class RetentionSettings:
    """How long finished jobs are kept, per final state; 0 keeps them forever.

    The leading scheduler's pruner (services/scheduler/pruner.py) deletes a job
    once this long has passed since its ``completed_at``. Its idempotency key is
    free again from then on.
    """

    succeeded_s: float = 86400.0
    cancelled_s: float = 86400.0
    failed_s: float = 7 * 86400.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RetentionSettings:
        read = _Reader(env)
        # Ten years: far beyond any real retention, short of float trouble in SQL.
        most = 3650 * 86400.0
        return cls(
            succeeded_s=read.seconds("RETENTION_SUCCEEDED", cls.succeeded_s, low=0, high=most),
            cancelled_s=read.seconds("RETENTION_CANCELLED", cls.cancelled_s, low=0, high=most),
            failed_s=read.seconds("RETENTION_FAILED", cls.failed_s, low=0, high=most),
        )


@dataclass(frozen=True)
class MetricsSettings:
    """Where the scheduler and workers serve /metrics, /health and /ready, and the
    queues every service labels by name besides ``default`` and those workers name
    in WORKER_QUEUES (any other queue is counted as ``other``)."""

    host: str = "0.0.0.0"
    port: int = 9100
    queues: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MetricsSettings:
        read = _Reader(env)
        listed = read.text("METRICS_QUEUES", "")
        queues = tuple(dict.fromkeys(q.strip() for q in listed.split(",") if q.strip()))
        for queue in queues:
            if len(queue) > 64:
                raise SettingsError("METRICS_QUEUES", f"{queue[:20]!r}... is over 64 characters")
        return cls(
            host=read.text("METRICS_HOST", cls.host),
            port=read.integer("METRICS_PORT", cls.port, low=0, high=65535),
            queues=queues,
        )


@dataclass(frozen=True)
class ApiSettings:
    """The REST API's listener, request limits, and how long it drains when stopped."""

    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 1024 * 1024
    # The body of one page of GET /api/v1/jobs stops before the job that would take
    # it past this (a page always holds one job, however large).
    list_max_bytes: int = 4 * 1024 * 1024
    shutdown_timeout_s: float = 30.0
    # The event stream (GET /api/v1/events): how often the API reads new events
    # while anyone listens, and how long a quiet stream waits before a heartbeat.
    events_poll_interval_s: float = 0.1
    events_heartbeat_s: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ApiSettings:
        read = _Reader(env)
        return cls(
            host=read.text("API_HOST", cls.host),
            port=read.integer("API_PORT", cls.port, low=1, high=65535),
            max_body_bytes=read.integer(
                "API_MAX_BODY_BYTES", cls.max_body_bytes, low=1024, high=64 * 1024 * 1024
            ),
            list_max_bytes=read.integer(
                "API_LIST_MAX_BYTES", cls.list_max_bytes, low=65536, high=256 * 1024 * 1024
            ),
            shutdown_timeout_s=read.seconds(
                "API_SHUTDOWN_TIMEOUT", cls.shutdown_timeout_s, low=0, high=86400
            ),
            events_poll_interval_s=read.seconds(
                "API_EVENTS_POLL_INTERVAL", cls.events_poll_interval_s, low=0.01, high=10
            ),
            events_heartbeat_s=read.seconds(
                "API_EVENTS_HEARTBEAT", cls.events_heartbeat_s, low=0.1, high=300
            ),
        )


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class AuthSettings:
    """Who may call the API: API keys (``orchestrix keys``), their cache, the limits.

    ``enabled`` False serves every route to anyone; ``allow_remote_unauthenticated``
    must then say so before the API listens on anything but a loopback address.
    ``open_ready`` / ``open_metrics``: /ready and /metrics need no key (the default:
    probes and Prometheus reach them); off, they need a key with ``metrics:read``.
    A key's requests and jobs per second are token buckets of each API process;
    a key's own values (``keys create``) win over these; 0 means unlimited.
    """

    enabled: bool = True
    allow_remote_unauthenticated: bool = False
    # A verified key is trusted this long in each process: the revocation delay.
    cache_ttl_s: float = 2.0
    open_ready: bool = True
    open_metrics: bool = True
    # Failed authentications one client address may make per window before its
    # failures answer 429 and its unknown keys are no longer looked up.
    failures_max: int = 20
    failure_window_s: float = 60.0
    requests_per_s: float = 1000.0
    requests_burst: int = 2000
    jobs_per_s: float = 5000.0
    jobs_burst: int = 10000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthSettings:
        read = _Reader(env)
        return cls(
            enabled=read.flag("API_AUTH", cls.enabled),
            allow_remote_unauthenticated=read.flag(
                "API_ALLOW_UNAUTHENTICATED_REMOTE", cls.allow_remote_unauthenticated
            ),
            # At most 5 s: the bound on how long a revoked key keeps working.
            cache_ttl_s=read.seconds("API_KEY_CACHE_TTL", cls.cache_ttl_s, low=0, high=5),
            open_ready=not read.flag("API_READY_AUTH", not cls.open_ready),
            open_metrics=not read.flag("API_METRICS_AUTH", not cls.open_metrics),
            failures_max=read.integer("API_AUTH_FAILURES", cls.failures_max, low=1, high=1_000_000),
            failure_window_s=read.seconds(
                "API_AUTH_FAILURE_WINDOW", cls.failure_window_s, low=1, high=86400
            ),
            requests_per_s=read.number(
                "API_KEY_REQUESTS_PER_S", cls.requests_per_s, low=0, high=1e9
            ),
            requests_burst=read.integer(
                "API_KEY_REQUESTS_BURST", cls.requests_burst, low=1, high=1_000_000_000
            ),
            jobs_per_s=read.number("API_KEY_JOBS_PER_S", cls.jobs_per_s, low=0, high=1e9),
            jobs_burst=read.integer(
                "API_KEY_JOBS_BURST", cls.jobs_burst, low=1, high=1_000_000_000
            ),
        )

    def check_listener(self, host: str) -> None:
        """Refuse to serve without keys beyond this machine unless told to."""
        if self.enabled or self.allow_remote_unauthenticated or is_loopback(host):
            return
        raise SettingsError(
            "API_AUTH",
            f"is off, and API_HOST {host!r} is not a loopback address: anyone who reaches "
            "it could read and cancel every job. Turn API_AUTH on, listen on 127.0.0.1, or "
            "set API_ALLOW_UNAUTHENTICATED_REMOTE=true to serve it without keys anyway",
        )


LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class LogSettings:
    """One line per event: readable text, or JSON for log shippers."""

    format: LogFormat = "text"
    level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LogSettings:
        read = _Reader(env)
        fmt = read.choice("LOG_FORMAT", cls.format, ("text", "json"))
        level = read.choice("LOG_LEVEL", cls.level.lower(), ("debug", "info", "warning", "error"))
        return cls(format="json" if fmt == "json" else "text", level=level.upper())


@dataclass(frozen=True)
class DevSettings:
    """How many of each service ``orchestrix dev`` runs."""

    schedulers: int = 1
    workers: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DevSettings:
        read = _Reader(env)
        return cls(
            schedulers=read.integer("SCHEDULERS", cls.schedulers, low=0, high=32),
            workers=read.integer("WORKERS", cls.workers, low=0, high=64),
        )


@dataclass(frozen=True)
class Settings:
    """Everything a process may need; each service reads the parts it uses."""

    database: DatabaseSettings
    nats: NatsSettings
    api: ApiSettings
    auth: AuthSettings
    log: LogSettings
    worker: WorkerSettings
    retry: RetrySettings
    metrics: MetricsSettings
    recovery: RecoverySettings
    retention: RetentionSettings
    dev: DevSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            database=DatabaseSettings.from_env(env),
            nats=NatsSettings.from_env(env),
            api=ApiSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            log=LogSettings.from_env(env),
            worker=WorkerSettings.from_env(env),
            retry=RetrySettings.from_env(env),
            metrics=MetricsSettings.from_env(env),
            recovery=RecoverySettings.from_env(env),
            retention=RetentionSettings.from_env(env),
            dev=DevSettings.from_env(env),
        )


# (variable, default, meaning): the table that `--help` texts and the README show.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("DATABASE_URL", "", "PostgreSQL URL; overrides the DB_* parts when set"),
    ("DB_HOST", "localhost", "PostgreSQL host"),
    ("DB_PORT", "5432", "PostgreSQL port"),
    ("DB_USER", "orchestrix", "PostgreSQL user"),
    ("DB_PASSWORD", "", "PostgreSQL password"),
    ("DB_NAME", "orchestrix", "PostgreSQL database"),
    ("DB_SSLMODE", "disable", "libpq sslmode: " + ", ".join(SSL_MODES)),
    ("DB_POOL_MIN_SIZE", "1", "connections each process keeps open"),
    ("DB_POOL_MAX_SIZE", "10", "most connections each process opens"),
    (
        "NATS_URL",
        "nats://127.0.0.1:4222",
        "NATS server; for a cluster, several comma-separated URLs",
    ),
    ("NATS_SUBJECT_PREFIX", "orchestrix.jobs", "prefix of the NATS subjects Orchestrix uses"),
    (
        "NATS_STREAM_REPLICAS",
        "1",
        "copies JetStream keeps of the hand-back ledger; 3 on a 3-node cluster",
    ),
    ("API_HOST", "0.0.0.0", "address the API listens on"),
    ("API_PORT", "8080", "port the API listens on"),
    ("API_MAX_BODY_BYTES", "1048576", "largest request body; bigger ones get 413"),
    (
        "API_LIST_MAX_BYTES",
        "4194304",
        "largest page of GET /api/v1/jobs; it ends before the job that would pass this",
    ),
    ("API_SHUTDOWN_TIMEOUT", "30s", "how long a stopping API lets requests in flight finish"),
    (
        "API_EVENTS_POLL_INTERVAL",
        "100ms",
        "how often the API reads new job events while anyone follows GET /api/v1/events",
    ),
    ("API_EVENTS_HEARTBEAT", "15s", "a quiet event stream sends a heartbeat this often"),
    ("API_AUTH", "on", "on: every route but /health and /openapi.json needs an API key"),
    (
        "API_ALLOW_UNAUTHENTICATED_REMOTE",
        "false",
        "true lets an API with API_AUTH=off listen on a non-loopback API_HOST",
    ),
    (
        "API_KEY_CACHE_TTL",
        "2s",
        "how long each API process trusts a verified key (at most 5s): the revocation delay",
    ),
    ("API_READY_AUTH", "off", "on: /ready needs a key with metrics:read"),
    ("API_METRICS_AUTH", "off", "on: /metrics needs a key with metrics:read (a bearer token)"),
    (
        "API_AUTH_FAILURES",
        "20",
        "failed authentications one client address may make per window; then 429",
    ),
    ("API_AUTH_FAILURE_WINDOW", "60s", "the window of API_AUTH_FAILURES"),
    (
        "API_KEY_REQUESTS_PER_S",
        "1000",
        "requests a key may make per second, per API process; 0: no limit",
    ),
    ("API_KEY_REQUESTS_BURST", "2000", "requests a key may make at once above its rate"),
    (
        "API_KEY_JOBS_PER_S",
        "5000",
        "jobs a key may create per second, per API process; 0: no limit",
    ),
    ("API_KEY_JOBS_BURST", "10000", "jobs a key may create at once above its rate"),
    ("METRICS_HOST", "0.0.0.0", "address of the scheduler's / worker's status port"),
    ("METRICS_PORT", "9100", "port of /metrics, /health, /ready for scheduler and worker"),
    (
        "METRICS_QUEUES",
        "",
        "comma-separated queues labelled by name in metrics, besides default and the "
        "WORKER_QUEUES of live workers; the rest are counted as other",
    ),
    ("WORKER_CONCURRENCY", "100", "jobs one worker process runs at once"),
    ("WORKER_QUEUES", "*", "comma-separated queues this worker takes jobs from; * for all"),
    (
        "WORKER_POLL_INTERVAL",
        "1s",
        "a worker with free slots looks for due jobs this often (wake-ups come sooner)",
    ),
    ("SHUTDOWN_TIMEOUT", "30s", "how long a stopping worker lets running jobs finish"),
    ("RETRY_BASE_DELAY", "1s", "backoff before the 2nd attempt; doubles each attempt"),
    ("RETRY_MAX_DELAY", "5m", "longest backoff between attempts"),
    ("LEASE_TIMEOUT", "30s", "lease of a running job (2s or more); renewed every third"),
    ("MAINTENANCE_INTERVAL", "5s", "how often the leading scheduler rescues expired leases"),
    ("RETENTION_SUCCEEDED", "24h", "SUCCEEDED jobs are deleted this long after they end; 0: kept"),
    ("RETENTION_CANCELLED", "24h", "CANCELLED jobs are deleted this long after they end; 0: kept"),
    ("RETENTION_FAILED", "7d", "FAILED jobs are deleted this long after they end; 0: kept"),
    ("ORCHESTRIX_EXECUTORS", "", "comma-separated modules the worker imports for executors"),
    ("SCHEDULERS", "1", "schedulers `orchestrix dev` runs"),
    ("WORKERS", "2", "workers `orchestrix dev` runs"),
    ("LOG_FORMAT", "text", "text or json (the container image sets json)"),
    ("LOG_LEVEL", "info", "debug, info, warning or error"),
)


def describe(names: tuple[str, ...]) -> str:
    """The lines of the variable table for ``names``, for a ``--help`` epilog."""
    rows = [row for row in VARIABLES if row[0] in names]
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"  {name:<{width}}  {meaning}" + (f" (default {default})" if default else "")
        for name, default, meaning in rows
    ]
    return "environment variables:\n" + "\n".join(lines)
