"""Every query on the ``workers`` table: the worker processes alive now.

A worker registers from its heartbeat connection, and the row names that
connection's PostgreSQL session. The session ends with the process (a SIGKILL
closes its socket), so a row whose session is gone is the first sign of a dead
worker; the scheduler's lifeline confirms it on NATS before taking its jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Conn = Any

_REGISTER = """
INSERT INTO workers (id, hostname, pid, queues, types, concurrency, backend_pid, backend_start)
SELECT $1, $2, $3, $4::text[], $5::text[], $6, pg_backend_pid(), backend_start
FROM pg_stat_activity WHERE pid = pg_backend_pid()
ON CONFLICT (id) DO UPDATE
SET backend_pid = excluded.backend_pid, backend_start = excluded.backend_start,
    queues = excluded.queues, types = excluded.types, concurrency = excluded.concurrency,
    seen_at = now()
"""

# Only from the session the row names: after a reconnect the worker registers again.
_BEAT = """
UPDATE workers SET seen_at = now()
WHERE id = $1 AND backend_pid = pg_backend_pid()
RETURNING id
"""

_DEREGISTER = "DELETE FROM workers WHERE id = $1"

# A session another role owns shows a NULL backend_start to us: counted as alive,
# never as gone.
_SESSION_GONE = """
SELECT id FROM workers AS w
WHERE NOT EXISTS (
    SELECT 1 FROM pg_stat_activity AS a
    WHERE a.pid = w.backend_pid AND (a.backend_start IS NULL OR a.backend_start = w.backend_start)
)
"""

_FORGET = "DELETE FROM workers WHERE id = ANY($1::text[])"

_SERVED = "SELECT queues, types FROM workers"

_LIST = "SELECT * FROM workers ORDER BY id"


@dataclass(frozen=True)
class Registration:
    id: str
    hostname: str
    pid: int
    queues: Sequence[str] | None  # None: every queue
    types: Sequence[str]
    concurrency: int


async def register(conn: Conn, worker: Registration) -> None:
    """Record ``worker`` as alive, tied to ``conn``'s session (again after a reconnect)."""
    await conn.execute(
        _REGISTER,
        worker.id,
        worker.hostname,
        worker.pid,
        None if worker.queues is None else list(worker.queues),
        list(worker.types),
        worker.concurrency,
    )


async def beat(conn: Conn, worker_id: str) -> bool:
    """Mark the worker seen; False when its row is gone or names another session."""
    return await conn.fetchval(_BEAT, worker_id) is not None


async def deregister(conn: Conn, worker_id: str) -> None:
    await conn.execute(_DEREGISTER, worker_id)


async def session_gone(conn: Conn) -> list[str]:
    """Workers whose registered PostgreSQL session no longer exists."""
    return [row["id"] for row in await conn.fetch(_SESSION_GONE)]


async def forget(conn: Conn, worker_ids: Sequence[str]) -> None:
    await conn.execute(_FORGET, list(worker_ids))


@dataclass(frozen=True)
class Served:
    """What the registered workers run, together: which types in which queues."""

    pairs: tuple[tuple[Sequence[str] | None, frozenset[str]], ...]

    def covers(self, queue: str, job_type: str) -> bool:
        return any(
            job_type in types and (queues is None or queue in queues)
            for queues, types in self.pairs
        )


async def served(conn: Conn) -> Served:
    rows = await conn.fetch(_SERVED)
    return Served(tuple((row["queues"], frozenset(row["types"])) for row in rows))


@dataclass(frozen=True)
class Worker:
    id: str
    hostname: str
    pid: int
    queues: Sequence[str] | None
    types: Sequence[str]
    concurrency: int
    started_at: datetime
    seen_at: datetime


async def list_all(conn: Conn) -> list[Worker]:
    return [
        Worker(
            row["id"],
            row["hostname"],
            row["pid"],
            row["queues"],
            row["types"],
            row["concurrency"],
            row["started_at"],
            row["seen_at"],
        )
        for row in await conn.fetch(_LIST)
    ]
