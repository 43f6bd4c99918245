"""Typed configuration: the only module that reads the environment.

Each concern is a frozen dataclass built by ``from_env(env)``; a service asks for
the ones it needs. A bad value raises :class:`SettingsError` at start with one
line naming the variable and what is wrong with it, so a misconfigured container
dies at once instead of misbehaving later.

Durations accept plain seconds (``1.5``) or a unit suffix (``500ms``, ``2s``,
``5m``, ``1h``, ``7d``).

Every secret (``DATABASE_URL``, ``DB_PASSWORD``, ``NATS_URL``, ``NATS_PASSWORD``,
``NATS_TOKEN``) may instead be read from a file named by the same variable with
``_FILE`` appended (Docker and Kubernetes secrets); giving both is an error. No
error message here shows a secret's value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit, urlunsplit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


# The secrets: each may instead be read from the file that NAME_FILE names.
FILE_VARIABLES = ("DATABASE_URL", "DB_PASSWORD", "NATS_URL", "NATS_PASSWORD", "NATS_TOKEN")

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

    def secret(self, name: str) -> str | None:
        """``name``, or the contents of the file ``name``_FILE names; never both.

        A file's trailing line break is dropped (``echo pw > file`` writes one).
        No message here shows the value: only which variable and which file.
        """
        assert name in FILE_VARIABLES, f"{name} is not listed in FILE_VARIABLES"
        value = self.raw(name)
        path = self.raw(f"{name}_FILE")
        if path is None:
            return value
        if value is not None:
            raise SettingsError(f"{name}_FILE", f"{name} is set too; set only one of them")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{name}_FILE", f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"{name}_FILE", f"{path} is not UTF-8 text") from None
        text = text.rstrip("\r\n")
        if not text:
            raise SettingsError(f"{name}_FILE", f"{path} is empty")
        return text

    def file(self, name: str) -> str | None:
        """A path that must name a readable file (a certificate, a key, a seed)."""
        path = self.raw(name)
        if path is not None:
            readable_file(name, path)
        return path


def readable_file(variable: str, path: str) -> None:
    """Raise SettingsError naming ``variable`` unless ``path`` is a file we can read."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except IsADirectoryError:
        raise SettingsError(variable, f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise SettingsError(variable, f"cannot read {path}: {exc.strerror}") from None


def _scheme_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """Why ``value`` is not a URL of one of ``schemes``, showing only its scheme.

    The rest may hold a password, and a value with no scheme may be anything (a
    password pasted in the wrong place): neither is echoed.
    """
    if value.startswith(tuple(f"{scheme}://" for scheme in schemes)):
        return None
    wanted = " or ".join(f"{scheme}://" for scheme in schemes)
    scheme, sep, _ = value.partition("://")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,19}", scheme):
        return f"must start with {wanted}, got a {scheme}:// URL"
    return f"must start with {wanted} (the value is not shown: it may hold a password)"


def redact(url: str) -> str:
    """``url`` with its password (or a NATS token: a user part alone) shown as ``***``.

    For error messages, which end up in logs: works on text that does not parse
    as a URL too, taking everything before the last ``@`` as the credentials. A
    ``password=`` (or ``sslpassword=``) query parameter is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = re.sub(r"((?:^|[?&])(?:ssl)?password=)[^&]*", r"\1***", rest)
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return f"{scheme}{sep}{rest}"
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
            # Without a scheme the entry may be anything (a password pasted in
            # the wrong place): only a URL is shown, with its credentials hidden.
            shown = f"got {redact(entry)!r}" if "://" in entry else "(not shown: no scheme)"
            raise SettingsError("NATS_URL", f"{where} {problem}, {shown}")
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


# libpq's TLS parameters, as a URL's query or the variable of each.
_DB_TLS = (
    ("sslmode", "DB_SSLMODE"),
    ("sslrootcert", "DB_SSLROOTCERT"),
    ("sslcert", "DB_SSLCERT"),
    ("sslkey", "DB_SSLKEY"),
)
_VERIFYING = ("require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class DatabaseSettings:
    """Where PostgreSQL is, who we are there, and how the connection is secured.

    ``url`` is one libpq connection URI holding it all (password and the TLS
    parameters included), which asyncpg (the services) and libpq through psycopg
    (the migrations) both read the same way: ``sslmode`` means what libpq's
    does. ``verify-full`` checks the server's certificate against
    ``DB_SSLROOTCERT`` and its name against the host; ``verify-ca`` the
    certificate only; ``require`` encrypts and, like libpq, checks the
    certificate only when a root certificate is given. ``DATABASE_URL`` wins over
    the ``DB_HOST``..``DB_NAME`` parts; the password (``DB_PASSWORD`` or
    ``DB_PASSWORD_FILE``) and the ``DB_SSL*`` variables apply to it too, unless
    the URL has its own (then giving both is an error). ``url`` is kept out of
    ``repr``: use ``shown_url`` in anything a person reads.
    """

    url: str = field(repr=False)
    pool_min_size: int = 1
    pool_max_size: int = 10
    sslmode: str | None = None

    @property
    def shown_url(self) -> str:
        """``url`` with the password hidden."""
        return redact(self.url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DatabaseSettings:
        read = _Reader(env)
        given = read.secret("DATABASE_URL")
        if given is not None:
            parts = _database_url(given)
        else:
            host = read.text("DB_HOST", "localhost")
            port = read.integer("DB_PORT", 5432, low=1, high=65535)
            user = read.text("DB_USER", "orchestrix")
            name = read.text("DB_NAME", "orchestrix")
            netloc = f"{quote(user, safe='')}@{_url_host(host)}:{port}"
            parts = SplitResult("postgresql", netloc, f"/{quote(name, safe='')}", "", "")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        password = read.secret("DB_PASSWORD")
        if password is not None and (parts.password is not None or "password" in query):
            raise SettingsError("DB_PASSWORD", "DATABASE_URL holds a password too; give it once")
        for key, variable in _DB_TLS:
            value = read.file(variable) if key != "sslmode" else None
            if key == "sslmode" and read.raw(variable) is not None:
                value = read.choice(variable, "disable", SSL_MODES)
            if value is None:
                continue
            if key in query and query[key] != value:
                raise SettingsError(variable, f"DATABASE_URL sets {key} too; give it once")
            query[key] = value
        if given is None:
            query.setdefault("sslmode", "disable")
        sslmode = _check_db_tls(query, from_url=given is not None)
        if password is not None:
            user = parts.username or ""
            netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{_url_host_port(parts)}"
            parts = parts._replace(netloc=netloc)
        url = urlunsplit(parts._replace(query=urlencode(query, safe="/")))
        pool_max = read.integer("DB_POOL_MAX_SIZE", 10, low=1, high=1000)
        pool_min = read.integer("DB_POOL_MIN_SIZE", min(1, pool_max), low=0, high=pool_max)
        return cls(url=url, pool_min_size=pool_min, pool_max_size=pool_max, sslmode=sslmode)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _url_host_port(parts: SplitResult) -> str:
    return parts.netloc.rpartition("@")[2]


def _database_url(value: str) -> SplitResult:
    """A DATABASE_URL checked far enough that neither driver echoes it back in an error."""
    problem = _scheme_problem(value, ("postgresql", "postgres"))
    if problem is not None:
        raise SettingsError("DATABASE_URL", problem)
    if any(char.isspace() for char in value):
        raise SettingsError("DATABASE_URL", "holds a space")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise SettingsError(
            "DATABASE_URL", "has a port that is not a number from 0 to 65535"
        ) from None
    if parts.fragment:
        raise SettingsError("DATABASE_URL", "has a #fragment")
    if "," in parts.netloc.rpartition("@")[2]:
        # libpq takes several hosts; asyncpg does too, but the two pick differently.
        raise SettingsError("DATABASE_URL", "names several hosts; give one")
    return parts


def _check_db_tls(query: dict[str, str], *, from_url: bool) -> str | None:
    """The effective sslmode, once the TLS parameters make sense together."""

    def name(key: str) -> str:
        variable = dict(_DB_TLS)[key]
        return f"{variable} (or {key} in DATABASE_URL)" if from_url else variable

    sslmode = query.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        raise SettingsError("DATABASE_URL", f"sslmode must be one of {', '.join(SSL_MODES)}")
    if from_url:
        for key in ("sslrootcert", "sslcert", "sslkey"):
            if key in query:
                readable_file("DATABASE_URL", query[key])
    if "sslrootcert" in query and sslmode not in _VERIFYING:
        raise SettingsError(
            name("sslrootcert"),
            f"is used only with sslmode {', '.join(_VERIFYING)}, not {sslmode or 'prefer'}",
        )
    if sslmode in ("verify-ca", "verify-full") and "sslrootcert" not in query:
        raise SettingsError(
            name("sslrootcert"),
            f"is needed with sslmode {sslmode}: the CA certificate that signed the server's",
        )
    if ("sslcert" in query) != ("sslkey" in query):
        missing = "sslkey" if "sslcert" in query else "sslcert"
        raise SettingsError(
            name(missing), "a client certificate needs both DB_SSLCERT and DB_SSLKEY"
        )
    if "sslcert" in query and sslmode == "disable":
        raise SettingsError(
            name("sslcert"), "a client certificate needs TLS (sslmode require or stricter)"
        )
    return sslmode


_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class NatsAuth:
    """Who a process is to NATS: at most one of user and password, a token, an
    NKey seed file, or a creds file (a user JWT with its seed). All None: no
    authentication, or the credentials inside ``NATS_URL``."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    creds_file: str | None = None

    @property
    def method(self) -> str:
        """How the process authenticates, for a log line: never the secret itself."""
        if self.user is not None:
            return "user and password"
        if self.token is not None:
            return "token"
        if self.nkey_seed_file is not None:
            return "nkey"
        if self.creds_file is not None:
            return "creds"
        return "no credentials"


@dataclass(frozen=True)
class NatsTls:
    """TLS towards NATS: the CA that signed the servers' certificates (None: the
    system's), and a client certificate and key when the servers ask for one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class NatsSettings:
    """Where NATS is, how a process proves who it is there, and the subjects Orchestrix uses.

    NATS carries signals, never the record: wake-ups for workers with free
    slots, cancel requests, and the lifeline's question to a worker that seems
    dead. PostgreSQL holds every job. ``servers`` are the URLs of ``NATS_URL``:
    one server, or the nodes of a cluster, any of which a process connects and
    reconnects to. One JetStream stream holds the hand-back ledger
    (``orchestrix.handbacks``), in ``stream_replicas`` copies: 3 on a three-node
    cluster, so that it outlives a node. ``tls`` is None for plain connections:
    it is set by ``tls://`` URLs or any ``NATS_TLS_*`` variable, and then every
    server must speak TLS.
    """

    servers: tuple[str, ...] = field(default=("nats://127.0.0.1:4222",), repr=False)
    subject_prefix: str = "orchestrix.jobs"
    stream_replicas: int = 1
    auth: NatsAuth = NatsAuth()
    tls: NatsTls | None = None

    @property
    def shown_servers(self) -> str:
        """The servers with any credentials in them hidden, for people to read."""
        return ",".join(redact(server) for server in self.servers)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NatsSettings:
        read = _Reader(env)
        prefix = read.text("NATS_SUBJECT_PREFIX", cls.subject_prefix)
        if not all(_TOKEN.match(token) for token in prefix.split(".")):
            raise SettingsError(
                "NATS_SUBJECT_PREFIX", "must be dot-separated tokens of letters, digits, '_', '-'"
            )
        servers = nats_servers(read.secret("NATS_URL") or "nats://127.0.0.1:4222")
        auth = _nats_auth(read, servers)
        tls = NatsTls(
            ca_file=read.file("NATS_TLS_CA"),
            cert_file=read.file("NATS_TLS_CERT"),
            key_file=read.file("NATS_TLS_KEY"),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            missing = "NATS_TLS_KEY" if tls.key_file is None else "NATS_TLS_CERT"
            raise SettingsError(
                missing, "a client certificate needs both NATS_TLS_CERT and NATS_TLS_KEY"
            )
        wants_tls = tls != NatsTls() or any(s.startswith("tls://") for s in servers)
        return cls(
            servers=servers,
            subject_prefix=prefix,
            # JetStream allows at most 5.
            stream_replicas=read.integer(
                "NATS_STREAM_REPLICAS", cls.stream_replicas, low=1, high=5
            ),
            auth=auth,
            tls=tls if wants_tls else None,
        )


def _nats_auth(read: _Reader, servers: tuple[str, ...]) -> NatsAuth:
    auth = NatsAuth(
        user=read.raw("NATS_USER"),
        password=read.secret("NATS_PASSWORD"),
        token=read.secret("NATS_TOKEN"),
        nkey_seed_file=read.file("NATS_NKEY_SEED"),
        creds_file=read.file("NATS_CREDS"),
    )
    if (auth.user is None) != (auth.password is None):
        missing = "NATS_PASSWORD" if auth.password is None else "NATS_USER"
        raise SettingsError(missing, "NATS_USER and NATS_PASSWORD go together")
    given = [
        variable
        for variable, value in (
            ("NATS_USER", auth.user),
            ("NATS_TOKEN", auth.token),
            ("NATS_NKEY_SEED", auth.nkey_seed_file),
            ("NATS_CREDS", auth.creds_file),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise SettingsError(given[1], f"{given[0]} is set too; choose one way to authenticate")
    if given and any("@" in server for server in servers):
        raise SettingsError(given[0], "NATS_URL holds credentials too; give them once")
    if auth.creds_file is not None:
        _check_creds(auth.creds_file)
    return auth


_CREDS_PARTS = (
    # (the line that opens the part, what the next line must look like, its name)
    ("BEGIN NATS USER JWT", re.compile(r"^[\w-]+\.[\w-]+\.[\w-]+$"), "user JWT"),
    ("BEGIN USER NKEY SEED", re.compile(r"^SU[A-Z2-7]+$"), "user NKey seed"),
)


def _check_creds(path: str) -> None:
    """Refuse a ``NATS_CREDS`` file that is not a creds file, naming the file only.

    nats-py reads the line after each BEGIN line as the JWT and the seed, when it
    connects; a file without them fails there with a TypeError that says
    nothing (or, without the JWT's line, never returns). The contents are never
    shown: a file in the wrong place may hold any secret.
    """
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise SettingsError("NATS_CREDS", f"{path} is not a creds file (not UTF-8 text)") from None
    except OSError as exc:
        raise SettingsError("NATS_CREDS", f"cannot read {path}: {exc.strerror}") from None
    for opening, shape, name in _CREDS_PARTS:
        starts = [i for i, line in enumerate(lines) if opening in line]
        if not starts or starts[0] + 1 >= len(lines) or not shape.match(lines[starts[0] + 1]):
            raise SettingsError(
                "NATS_CREDS",
                f"{path} is not a creds file: no {name} on the line after "
                f"'-----{opening}-----' (nsc writes them; the contents are not shown)",
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
    # demo_job and noop (orchestrix.builtin): for `orchestrix dev` and tests, not
    # production, where a batch of hour-long demo_job sleeps would hold the slots.
    demo_executors: bool = False

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
            demo_executors=read.flag("WORKER_DEMO_EXECUTORS", cls.demo_executors),
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
    (
        "DATABASE_URL",
        "",
        "PostgreSQL URL; overrides DB_HOST..DB_NAME when set (or DATABASE_URL_FILE)",
    ),
    ("DB_HOST", "localhost", "PostgreSQL host"),
    ("DB_PORT", "5432", "PostgreSQL port"),
    ("DB_USER", "orchestrix", "PostgreSQL user"),
    ("DB_PASSWORD", "", "PostgreSQL password (or DB_PASSWORD_FILE: a file holding it)"),
    ("DB_NAME", "orchestrix", "PostgreSQL database"),
    (
        "DB_SSLMODE",
        "disable",
        "libpq sslmode: " + ", ".join(SSL_MODES) + "; verify-full checks the server's "
        "certificate and name",
    ),
    ("DB_SSLROOTCERT", "", "CA certificate file the server's certificate must chain to"),
    ("DB_SSLCERT", "", "client certificate file, for servers that ask for one"),
    ("DB_SSLKEY", "", "the client certificate's private key file"),
    ("DB_POOL_MIN_SIZE", "1", "connections each process keeps open"),
    ("DB_POOL_MAX_SIZE", "10", "most connections each process opens"),
    (
        "NATS_URL",
        "nats://127.0.0.1:4222",
        "NATS server; for a cluster, several comma-separated URLs (or NATS_URL_FILE)",
    ),
    ("NATS_USER", "", "NATS user name; with NATS_PASSWORD"),
    ("NATS_PASSWORD", "", "NATS password (or NATS_PASSWORD_FILE)"),
    ("NATS_TOKEN", "", "NATS authentication token (or NATS_TOKEN_FILE)"),
    ("NATS_NKEY_SEED", "", "file holding the NKey seed to authenticate with"),
    ("NATS_CREDS", "", "NATS creds file (user JWT and seed) to authenticate with"),
    ("NATS_TLS_CA", "", "CA certificate file for NATS TLS; any NATS_TLS_* or tls:// turns TLS on"),
    ("NATS_TLS_CERT", "", "client certificate file, for NATS servers that verify clients"),
    ("NATS_TLS_KEY", "", "the client certificate's private key file"),
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
    (
        "WORKER_DEMO_EXECUTORS",
        "false",
        "true: also run the demo executors demo_job and noop (`orchestrix dev` sets it)",
    ),
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
