"""Many tasks, one database round trip: a batcher gathers what tasks submit
while the event loop is busy, and writes it all with one statement.

Jobs of a worker that finish together have their outcomes written together,
instead of one UPDATE per job. A batch is flushed as soon as the loop is free
(no timer, so an idle process adds no delay), and while one flush is in flight
the next batch keeps filling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# flush(items) -> one result per item, in order.
Flush = Callable[[Sequence[T]], Awaitable[Sequence[R]]]


class Batcher(Generic[T, R]):
    def __init__(self, flush: Flush[T, R], max_size: int) -> None:
        self._flush = flush
        self._max_size = max_size
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[R]] = []
        self._running: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next flush and wait for its result (or its error)."""
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        if self._running is None:
            self._running = asyncio.create_task(self._drain())
        return await waiter

    async def _drain(self) -> None:
        try:
            # Let every task that is ready this turn of the loop add its item first.
            await asyncio.sleep(0)
            while self._items:
                items, self._items = self._items[: self._max_size], self._items[self._max_size :]
                waiters, self._waiters = (
                    self._waiters[: self._max_size],
                    self._waiters[self._max_size :],
                )
                try:
                    results = await self._flush(items)
                except Exception as exc:  # each submitter decides whether to retry
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                for waiter, result in zip(waiters, results, strict=True):
                    if not waiter.done():
                        waiter.set_result(result)
        except asyncio.CancelledError:
            for waiter in self._waiters:
                waiter.cancel()
            self._items.clear()
            self._waiters.clear()
            raise
        finally:
            self._running = None
            if self._items:  # submitted while we were finishing up
                self._running = asyncio.create_task(self._drain())
