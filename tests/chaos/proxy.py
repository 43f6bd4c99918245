"""A TCP proxy on 127.0.0.1 that the chaos suite puts between a worker and PostgreSQL.

Each :class:`Proxy` listens on a port of its own and forwards every connection
to one upstream address. Its mode applies to all its connections at once, and
can change while they are open:

- ``passthrough()``: bytes flow both ways as they arrive.
- ``cut()``: nothing is forwarded either way, but every socket stays open, as
  in a network partition: the client sees no error, only silence. New
  connections are accepted and then hang. What was sent meanwhile waits in the
  sockets' buffers and flows once the cut ends, as TCP would deliver it after
  the network heals.
- ``latency(ms)``: every chunk is delivered ``ms`` milliseconds after it
  arrived, in order (one way; a round trip gains twice ``ms``).

A connection ends when either side closes it: the proxy then closes the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from urllib.parse import urlsplit, urlunsplit


class Proxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()  # set unless cut
        self._open.set()
        self._latency_s = 0.0
        self._closed = False
        self._handlers: set[asyncio.Task[None]] = set()  # one per connection, made by asyncio
        self._pipes: set[asyncio.Task[None]] = set()  # two per connection
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def mode(self) -> str:
        """``pass``, ``cut`` or ``latency <ms>``: for the run's timeline."""
        if not self._open.is_set():
            return "cut"
        return f"latency {self._latency_s * 1000:.0f}ms" if self._latency_s else "pass"

    def url(self, url: str) -> str:
        """``url`` (a database URL naming the upstream) reached through this proxy."""
        parts = urlsplit(url)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1; returns it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def passthrough(self) -> None:
        self._latency_s = 0.0
        self._open.set()

    def cut(self) -> None:
        self._open.clear()

    def latency(self, ms: float) -> None:
        self._latency_s = ms / 1000
        self._open.set()

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        self._open.set()  # connections held by a cut see the close and end
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        # The connection handlers end on their own once their pipes have: asyncio
        # owns their tasks, and would log a cancelled one as an error.
        await asyncio.gather(*self._pipes, *self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
            me.add_done_callback(self._handlers.discard)
        self._writers.add(client_w)
        try:
            await self._open.wait()  # a connection made during a cut hangs
            if self._closed:
                return
            try:
                upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            self._writers.add(upstream_w)
            try:
                # Either direction ending (EOF, error) ends the connection.
                one = asyncio.ensure_future(self._pipe(client_r, upstream_w))
                other = asyncio.ensure_future(self._pipe(upstream_r, client_w))
                for task in (one, other):
                    self._pipes.add(task)
                    task.add_done_callback(self._pipes.discard)
                await asyncio.wait([one, other], return_when=asyncio.FIRST_COMPLETED)
                one.cancel()
                other.cancel()
            finally:
                self._writers.discard(upstream_w)
                upstream_w.close()
        finally:
            self._writers.discard(client_w)
            client_w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction: read while open, deliver each chunk when it is due."""
        due: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        ended = False

        async def deliver() -> None:
            while True:
                while not due:
                    if ended:
                        return
                    arrived.clear()
                    await arrived.wait()
                at, data = due[0]
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._open.wait()
                due.popleft()
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                await self._open.wait()
                data = await reader.read(65536)
                if not data or delivering.done():
                    break
                due.append((time.monotonic() + self._latency_s, data))
                arrived.set()
            ended = True
            arrived.set()
            await delivering  # what was read still goes out, then the end
        except (OSError, ConnectionError):
            pass
        finally:
            delivering.cancel()
            with contextlib.suppress(BaseException):
                await delivering
