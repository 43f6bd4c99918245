"""PostgreSQL and NATS servers that the chaos suite owns, so it can stop and restart them.

The session servers of ``tests/conftest.py`` are shared by every test and must not
be restarted; a chaos run starts its own in its own folder instead: one
PostgreSQL and a three-node NATS cluster (``tests/nats_cluster.py``), whose
three URLs the services get in ``NATS_URL``. Each server keeps its port and its
data folder across restarts, so the services' URLs stay valid and they only
have to reconnect.
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
from tests.nats_cluster import NatsCluster

DATABASE = "orchestrix_chaos"


class ChaosServers:
    """One embedded PostgreSQL and a three-node NATS cluster, with restart methods.

    The blocking server calls run in a thread (``asyncio.to_thread``) so the
    chaos run's other tasks (submitting jobs, watching processes) go on while a
    server is down.
    """

    def __init__(self, root: Path) -> None:
        """Pick the ports once: every restart reuses them."""
        self.root = root
        self.postgres = EmbeddedPostgres(root / "postgres", port=free_port())
        self.nats = NatsCluster(root / "nats")
        self.admin_url = ""
        self.database_url = ""
        self.nats_url = ""

    async def start(self) -> None:
        """Start both servers, create the database and migrate it to the newest revision."""
        self.admin_url = await asyncio.to_thread(self.postgres.start, 60.0)
        await asyncio.to_thread(self.nats.start, 30.0)
        self.nats_url = ",".join(self.nats.urls)
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
        """Stop every NATS node with SIGTERM (clean) or SIGKILL (no chance to flush anything)."""
        for node in self.nats.nodes:
            if how is signal.SIGKILL:
                await asyncio.to_thread(node.kill)
            else:
                await asyncio.to_thread(node.stop, 15.0)

    async def start_nats(self) -> None:
        """Start every node again on its ports and store; return once the cluster formed."""
        for node in self.nats.nodes:
            await asyncio.to_thread(node.start, 30.0)
        await asyncio.to_thread(self.nats.wait_formed, 30.0)

    async def kill_nats_node(self, index: int) -> EmbeddedNats:
        """SIGKILL one node of the cluster; the other two go on serving."""
        node = self.nats.nodes[index]
        await asyncio.to_thread(self.nats.kill, node)
        return node

    async def restart_nats_node(self, node: EmbeddedNats) -> None:
        """Start a killed node again; return once it has rejoined the cluster."""
        await asyncio.to_thread(self.nats.restart, node, 30.0)

    @property
    def log_paths(self) -> list[Path]:
        """Every server's log file."""
        return [self.postgres.log_path, *(node.log_path for node in self.nats.nodes)]

    def stop(self) -> None:
        """Stop both servers; safe to call at any point, also after a failed start."""
        self.nats.stop()
        self.postgres.stop()


def _wait_quietly(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for a signalled server to exit; if it does not, its ``stop()`` kills it."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
