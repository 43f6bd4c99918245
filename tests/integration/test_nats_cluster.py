"""A process given every node of a three-node NATS cluster outlives the loss of its node.

The cluster is real (tests/nats_cluster.py: three nats-server processes on
127.0.0.1 with routes and JetStream), and the client is the one every service
opens: ``broker.connect`` with the settings read from a ``NATS_URL`` that lists
the three nodes. The node the client is connected to is SIGKILLed; the client
must come back on another node and core NATS (plain subscriptions and
request/reply, both ways across nodes) must keep working; the killed node
restarts and rejoins. A three-replica JetStream stream keeps taking and giving
messages while its leader is dead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
import pytest
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from orchestrix import broker
from orchestrix.devservers import EmbeddedNats
from orchestrix.settings import NatsSettings

from tests.nats_cluster import NatsCluster

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
# What a request may raise while the cluster heals: interest not yet propagated
# over the routes, our node gone.
HEALING = (
    nats_errors.TimeoutError,
    nats_errors.NoRespondersError,
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.StaleConnectionError,
)
# What the client's error callback hears when its node is killed under it.
KILLED = (nats_errors.UnexpectedEOF, OSError)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def eventually(attempt: Callable[[], Awaitable[T]], what: str, timeout_s: float = 15.0) -> T:
    """``attempt()`` until it returns, retrying what a healing cluster raises."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await attempt()
        except HEALING as exc:
            if loop.time() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout_s}s") from exc
        await asyncio.sleep(0.05)


class Party:
    """A client with a responder and an inbox, to show traffic between nodes."""

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    @classmethod
    async def on(cls, nc: Client, name: str) -> Party:
        """Answers requests on ``ask.<name>`` with its name; collects ``to.<name>``."""
        client = cls(nc, name)

        async def answer(msg: Msg) -> None:
            await msg.respond(name.encode())

        async def collect(msg: Msg) -> None:
            await client.inbox.put(msg.data)

        await nc.subscribe(f"cluster.ask.{name}", cb=answer)
        await nc.subscribe(f"cluster.to.{name}", cb=collect)
        await nc.flush()
        return client

    async def ask(self, other: Party) -> str:
        """A request that ``other`` answers, retried until the routes know of it."""

        async def request() -> str:
            reply = await self.nc.request(f"cluster.ask.{other.name}", b"?", timeout=1)
            return reply.data.decode()

        return await eventually(request, f"{self.name} asking {other.name}")

    async def tell(self, other: Party) -> None:
        """Publish to ``other`` until it has a message: interest crosses routes lazily."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15.0
        while other.inbox.empty():
            assert loop.time() < deadline, f"{other.name} never heard from {self.name}"
            await self.nc.publish(f"cluster.to.{other.name}", self.name.encode())
            await self.nc.flush()
            await asyncio.sleep(0.05)
        assert await other.inbox.get() == self.name.encode()
        while not other.inbox.empty():
            other.inbox.get_nowait()


async def pinned(cluster: NatsCluster, node: EmbeddedNats) -> Party:
    """A client of one node only, answering as that node."""
    nc = await nats.connect(cluster.urls[cluster.nodes.index(node)], allow_reconnect=False)
    return await Party.on(nc, node.server_name)


def settings_for(cluster: NatsCluster, **env: str) -> NatsSettings:
    return NatsSettings.from_env({"NATS_URL": ",".join(cluster.urls), **env})


async def test_a_client_of_the_cluster_survives_the_loss_of_its_node(
    cluster: NatsCluster,
) -> None:
    settings = settings_for(cluster)
    reconnected = asyncio.Event()
    errors: list[Exception] = []

    async def on_reconnect() -> None:
        reconnected.set()

    async def on_error(exc: Exception) -> None:
        errors.append(exc)  # the killed node's connection ends with an EOF

    nc = await broker.connect(
        settings, "cluster-test", reconnected_cb=on_reconnect, error_cb=on_error
    )
    peers: list[Party] = []
    try:
        assert len(settings.servers) == 3
        assert nc.connected_url is not None
        first = cluster.node_at(nc.connected_url.port)
        client = await Party.on(nc, "client")
        survivors = {node.server_name: node for node in cluster.nodes if node is not first}
        for node in survivors.values():
            peers.append(await pinned(cluster, node))
        for peer in peers:  # across the routes, before anything breaks
            assert await peer.ask(client) == "client"
            assert await client.ask(peer) == peer.name

        await asyncio.to_thread(cluster.kill, first)
        await asyncio.wait_for(reconnected.wait(), timeout=10)
        assert nc.is_connected
        assert nc.connected_url is not None
        second = cluster.node_at(nc.connected_url.port)
        assert second is not first
        # The survivor the client is not on: everything it exchanges with the
        # client crosses a route.
        (far,) = [peer for peer in peers if peer.name != second.server_name]
        assert await far.ask(client) == "client"
        assert await client.ask(far) == far.name
        await far.tell(client)
        await client.tell(far)

        await asyncio.to_thread(cluster.restart, first)
        assert cluster.route_peers(first) == set(survivors)
        peers.append(back := await pinned(cluster, first))
        assert await back.ask(client) == "client"
        assert await client.ask(back) == first.server_name
        await back.tell(client)
        await client.tell(back)
        assert nc.connected_url is not None
        assert cluster.node_at(nc.connected_url.port) is second, "no reconnect needed"
    finally:
        for peer in peers:
            await peer.nc.close()
        await nc.close()
    assert all(isinstance(exc, KILLED) for exc in errors), errors
