"""The NATS connection's end, on a real server that the test stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrix import broker
from orchestrix.devservers import EmbeddedNats
from orchestrix.settings import NatsSettings

from tests.conftest import free_port
from tests.e2e.harness import until


async def test_disconnect_while_nats_is_away_closes_without_raising(tmp_path: Path) -> None:
    # A process that stops while NATS is away (reconnecting) must still exit
    # cleanly: drain() refuses a reconnecting connection.
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = await asyncio.to_thread(server.start)
    try:
        nc = await broker.connect(NatsSettings(servers=(url,)), "test-disconnect")
        await asyncio.to_thread(server.kill)
        await until(lambda: nc.is_reconnecting, 10, "the client to notice")
        await broker.disconnect(nc)
        assert nc.is_closed
    finally:
        server.stop()


async def test_disconnect_drains_a_connected_client(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = await asyncio.to_thread(server.start)
    try:
        nc = await broker.connect(NatsSettings(servers=(url,)), "test-disconnect")
        await broker.disconnect(nc)
        assert nc.is_closed
    finally:
        server.stop()
