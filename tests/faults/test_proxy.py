"""The fault proxy on a plain echo server, on PostgreSQL and on NATS."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import nats
import pytest
from nats.aio.msg import Msg

from tests.conftest import Servers
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """An echo server's port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
def proxy(echo: int) -> Iterator[Proxy]:
    proxy = Proxy("127.0.0.1", echo)
    proxy.start()
    yield proxy
    proxy.stop()


async def connected(
    proxy: Proxy,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await reader.readexactly(len(data))


async def test_pass_forwards_both_ways(proxy: Proxy) -> None:
    reader, writer = await connected(proxy)
    assert await echoed(reader, writer, b"hello") == b"hello"
    writer.close()


async def test_latency_delays_each_direction(proxy: Proxy) -> None:
    reader, writer = await connected(proxy)
    await echoed(reader, writer, b"warm")
    proxy.latency(100)
    started = time.monotonic()
    assert await echoed(reader, writer, b"slow") == b"slow"
    assert 0.2 <= time.monotonic() - started < 1.0
    writer.close()


async def test_a_cut_holds_data_and_closes_until_healed(proxy: Proxy) -> None:
    reader, writer = await connected(proxy)
    await echoed(reader, writer, b"before")
    proxy.cut()
    writer.write(b"held")
    with pytest.raises(TimeoutError):  # no data, and no EOF either
        await asyncio.wait_for(reader.read(10), 0.5)
    # A connection made during the cut neither fails nor reaches the server.
    late_reader, late_writer = await connected(proxy)
    late_writer.write(b"late")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late_reader.read(10), 0.3)
    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
    assert await asyncio.wait_for(late_reader.readexactly(4), 2) == b"late"
    writer.close()
    late_writer.close()


async def test_close_ends_every_connection_and_refuses_new_ones(proxy: Proxy) -> None:
    reader, writer = await connected(proxy)
    await echoed(reader, writer, b"before")
    proxy.close()
    assert await asyncio.wait_for(reader.read(10), 2) == b""
    fresh_reader, fresh_writer = await connected(proxy)
    assert await asyncio.wait_for(fresh_reader.read(10), 2) == b""
    proxy.heal()
    again_reader, again_writer = await connected(proxy)
    assert await echoed(again_reader, again_writer, b"after") == b"after"
    for w in (writer, fresh_writer, again_writer):
        w.close()


async def test_postgresql_through_the_proxy(database: str) -> None:
    proxy = Proxy.to(database)
    try:
        conn = await asyncpg.connect(proxy.url(database))
        assert await conn.fetchval("SELECT 1") == 1
        proxy.cut()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 2", timeout=0.5)
        with pytest.raises(TimeoutError):
            await asyncpg.connect(proxy.url(database), timeout=0.5)
        proxy.close()
        assert conn.is_closed() or not await _answers(conn)
        proxy.heal()
        again = await asyncpg.connect(proxy.url(database))
        assert await again.fetchval("SELECT 3") == 3
        await again.close()
        conn.terminate()
    finally:
        proxy.stop()


async def _answers(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=2)
    except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
        return False
    return True


async def test_nats_through_the_proxy(servers: Servers) -> None:
    # Requests, not flush(timeout): nats-py's read loop dies on the PONG of a
    # flush that timed out (tests/e2e/test_faults.py).
    subject = f"proxytest.{secrets.token_hex(4)}"
    direct = await nats.connect(servers.nats_url)

    async def pong(msg: Msg) -> None:
        await msg.respond(b"pong")

    await direct.subscribe(subject, cb=pong)
    await direct.flush()
    proxy = Proxy.to(servers.nats_url)
    try:
        nc = await nats.connect(proxy.url(servers.nats_url), allow_reconnect=False)
        assert (await nc.request(subject, b"ping", timeout=2)).data == b"pong"
        proxy.cut()
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(subject, b"ping", timeout=0.5)
        proxy.heal()
        assert (await nc.request(subject, b"ping", timeout=2)).data == b"pong"
        await nc.close()
    finally:
        proxy.stop()
        await direct.close()
