"""Fixtures of the chaos suite: servers of its own, which it is free to restart."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.servers import ChaosServers


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``chaos`` marker, so ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers",
        "chaos: kills, stops and restarts processes and servers, cuts and slows PostgreSQL "
        "while jobs run; `make chaos` runs every one (the short run is also part of `make test`)",
    )


@pytest.fixture
async def chaos_servers(tmp_path: Path) -> AsyncIterator[ChaosServers]:
    """A PostgreSQL and a NATS server for one test, stopped at its end whatever happened.

    Their data lives outside pytest's base temp folder: as root, PostgreSQL runs
    as an unprivileged user that needs to traverse every parent folder, and a
    pytest session starting meanwhile resets ``/tmp/pytest-of-<user>`` to 0700,
    which would stop the server from starting again after a restart. The server
    logs are copied to ``tmp_path / "servers"`` at the end.
    """
    root = Path(tempfile.mkdtemp(prefix="orx-chaos-"))
    servers = ChaosServers(root)
    try:
        await servers.start()
        yield servers
    finally:
        servers.stop()
        logs = tmp_path / "servers"
        logs.mkdir(exist_ok=True)
        for log in servers.log_paths:
            if log.exists():
                shutil.copy(log, logs / f"{log.parent.name}-{log.name}")
        shutil.rmtree(root, ignore_errors=True)
