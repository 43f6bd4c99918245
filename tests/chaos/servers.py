"""PostgreSQL and NATS servers that the chaos suite owns, so it can stop and restart them.

The session servers of ``tests/conftest.py`` are shared by every test and must not
be restarted; a chaos run starts its own pair in its own folder instead. Each
server keeps its port and its data folder across restarts, so the services'
URLs stay valid and they only have to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from pathlib import Path

import asyncpg
from orchestrix import migrate
from orchestrix.devservers import EmbeddedNats, EmbeddedPostgres
from orchestrix.devstack import database_url

from tests.conftest import free_port

DATABASE = "orchestrix_chaos"


class ChaosServers:
    """One embedded PostgreSQL and one embedded NATS, with restart methods.

    The blocking server calls run in a thread (``asyncio.to_thread``) so the
    chaos run's other tasks (submitting jobs, watching processes) go on while a
    server is down.
    """

    def __init__(self, root: Path) -> None:
        """Pick the two ports once: every restart reuses them."""
        self.root = root
        self.postgres = EmbeddedPostgres(root / "postgres", port=free_port())
        self.nats = EmbeddedNats(root / "nats", port=free_port())
        self.admin_url = ""
        self.database_url = ""
        self.nats_url = ""

    async def start(self) -> None:
        """Start both servers, create the database and migrate it to the newest revision."""
        self.admin_url = await asyncio.to_thread(self.postgres.start, 60.0)
        self.nats_url = await asyncio.to_thread(self.nats.start, 30.0)
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        self.database_url = database_url(self.admin_url, DATABASE)
        await asyncio.to_thread(migrate.up, self.database_url)

    async def stop_postgres(self, mode: str) -> None:
        """Stop PostgreSQL: ``fast`` (SIGINT, a clean shutdown) or ``immediate``.

        ``immediate`` is SIGQUIT: the server exits without a checkpoint and runs
        crash recovery on its next start, as after a power loss of the server alone.
        """
        if mode == "immediate":
            process = self.postgres.process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGQUIT)
                await asyncio.to_thread(_wait_quietly, process, 15.0)
        elif mode != "fast":
            raise ValueError(f"unknown PostgreSQL stop mode {mode!r}")
        await asyncio.to_thread(self.postgres.stop, 15.0)

    async def start_postgres(self) -> None:
        """Start PostgreSQL again on the same port and data folder."""
        await asyncio.to_thread(self.postgres.start, 60.0)

    async def stop_nats(self, how: signal.Signals) -> None:
        """Stop NATS with SIGTERM (clean) or SIGKILL (no chance to flush anything)."""
        process = self.nats.process
        if how is signal.SIGKILL and process is not None and process.poll() is None:
            process.kill()
            await asyncio.to_thread(_wait_quietly, process, 10.0)
        await asyncio.to_thread(self.nats.stop, 15.0)

    async def start_nats(self) -> None:
        """Start NATS again on the same port; JetStream reads its data folder back."""
        await asyncio.to_thread(self.nats.start, 30.0)

    def stop(self) -> None:
        """Stop both servers; safe to call at any point, also after a failed start."""
        self.nats.stop()
        self.postgres.stop()


def _wait_quietly(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for a signalled server to exit; if it does not, its ``stop()`` kills it."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
