"""A TCP proxy that tests control, to put a real network fault between a service
and a server (PostgreSQL, NATS) while everything else reaches it directly.

What the proxy does to its connections:

- ``heal()``: bytes flow both ways, as soon as they arrive.
- ``cut()``: a hung network. Nothing flows either way and nothing is closed: no
  FIN, no RST reaches either side, not even when one of them closes its socket.
  What is sent meanwhile waits, as TCP would retransmit it, and arrives once
  the cut is healed. A new connection is accepted (by the kernel, as any
  listening socket would) but reaches the server only then.
- ``close()``: the server is away. Every connection is closed at once, both
  sides, and a new one is closed as soon as it is accepted.
- ``latency(ms)``: every chunk is held ``ms`` milliseconds in each direction
  (so a round trip takes twice that), in order, without limiting throughput.

The proxy runs its own event loop in a thread: a test that blocks (waiting for
a process to exit) never stalls the traffic it forwards, and the methods above
may be called from any thread. Each returns once the change is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")
CHUNK = 65536


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    CLOSED = "closed"


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = Mode.PASS
        self.latency_s = 0.0
        self.accepted = 0  # connections accepted so far, for tests of the tests
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        # Each connection's task, and the transports it holds (to close them at once).
        self._links: dict[asyncio.Task[None], list[asyncio.WriteTransport]] = {}

    @classmethod
    def to(cls, url: str) -> Proxy:
        """A started proxy to the server of ``url`` (postgresql://…, nats://…)."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"no host and port in {url!r}")
        proxy = cls(parts.hostname, parts.port)
        proxy.start()
        return proxy

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # --- control, from any thread ---------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._start)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def heal(self) -> None:
        """Back to plain forwarding: no cut, no latency; what a cut held flows now."""
        self._call(self._set, Mode.PASS, 0.0)

    def cut(self) -> None:
        self._call(self._set, Mode.CUT, self.latency_s)

    def close(self) -> None:
        self._call(self._set, Mode.CLOSED, 0.0)

    def latency(self, ms: float) -> None:
        self._call(self._set, Mode.PASS, ms / 1000)

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(10)

    # --- on the proxy's loop -----------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._close_all()

    async def _set(self, mode: Mode, latency_s: float) -> None:
        assert self._flowing is not None
        self.mode, self.latency_s = mode, latency_s
        if mode is Mode.CUT:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is Mode.CLOSED:
            await self._close_all()

    async def _close_all(self) -> None:
        for task, transports in list(self._links.items()):
            for transport in transports:
                transport.abort()
            task.cancel()
        if self._links:
            await asyncio.wait(list(self._links))

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        assert self._flowing is not None
        self.accepted += 1
        if self.mode is Mode.CLOSED:
            client.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        transports: list[asyncio.WriteTransport] = [client.transport]
        self._links[task] = transports
        try:
            # During a cut the server never hears of this connection.
            await self._flowing.wait()
            server_reader, server = await asyncio.open_connection(*self.target)
            transports.append(server.transport)
            pipes = [
                asyncio.create_task(self._pipe(client_reader, server)),
                asyncio.create_task(self._pipe(server_reader, client)),
            ]
            try:
                # One side closed (and, past any cut, the other side was told).
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for transport in transports:
                transport.abort()
            self._links.pop(task, None)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Forward one direction: chunks stamped when read, written when due and not cut."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            data = b"x"
            while data:
                try:
                    data = await source.read(CHUNK)
                except OSError:
                    data = b""  # a reset: passed on as a close, when the cut allows
                chunks.put_nowait((loop.time() + self.latency_s, data))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await chunks.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                if not data:
                    return
                sink.write(data)
                await sink.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
