"""The threads plain-function executors run in, each counted until its function returns.

A thread cannot be interrupted. When an attempt is abandoned (it timed out, was
cancelled or handed back) its function keeps running, and so its thread stays
taken until the function returns: :attr:`Threads.abandoned` says how many are
held that way, so that the consumer counts them as busy slots and takes no work
for threads it does not have.

An attempt that finds every thread taken waits for one (:meth:`Threads.start`
returns once its function is running), so its timeout starts with its function
and it can never time out, or fail, for want of a thread.

The threads are daemons and are never joined while busy: a stuck function does
not keep the worker process from exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any, Generic, TypeVar

log = logging.getLogger("worker")
R = TypeVar("R")
# How long shutdown waits for each idle thread to exit (they do at once).
IDLE_JOIN_S = 1.0


class _State(Enum):
    QUEUED = "queued"  # holds a thread, not yet picked up by it
    RUNNING = "running"
    DONE = "done"  # the function returned or raised
    DROPPED = "dropped"  # abandoned before it started: it never runs


class Call(Generic[R]):
    """One function given to a thread; made by :meth:`Threads.start`."""

    def __init__(self, threads: Threads, fn: Callable[[], R]) -> None:
        self._threads = threads
        self._fn = fn
        self._loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = self._loop.create_future()
        self._done: asyncio.Future[R] = self._loop.create_future()
        self._state = _State.QUEUED  # under the pool's lock
        self._abandoned = False

    async def result(self) -> R:
        """The function's return value, or its exception raised here."""
        return await self._done

    def abandon(self) -> None:
        """The caller no longer wants the result (timeout, cancel, hand-back).

        A function not yet started never runs, and its thread is free at once; a
        running one keeps its thread, counted as abandoned, until it returns.
        Does nothing once the function returned, or if called again.
        """
        self._threads._abandon(self)

    def _run(self) -> None:
        """In the thread: run the function unless it was dropped, then free the thread."""
        if not self._threads._begin(self):
            return
        self._notify(self._started, None, None)
        value: Any = None
        error: BaseException | None = None
        try:
            value = self._fn()
        except StopIteration as exc:  # an asyncio future refuses to carry one
            error = RuntimeError(f"the executor raised StopIteration: {exc!r}")
        except BaseException as exc:  # handed to the caller, never the thread's to handle
            error = exc
        finally:
            self._threads._finish(self)
        self._notify(self._done, value, error)

    def _notify(self, future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():  # the caller stopped waiting
                return
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

        # The loop may be closed by the time an abandoned function returns.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle)


class Threads:
    """At most ``size`` threads; a thread is taken from :meth:`start` until its function returns.

    Counts are kept under a lock and may be read from any thread.
    """

    def __init__(self, size: int, name: str = "executor") -> None:
        if size < 1:
            raise ValueError("a thread pool needs at least one thread")
        self._size = size
        self._name = name
        self._lock = threading.Lock()
        self._taken = 0  # calls queued or running, abandoned ones included
        self._abandoned = 0
        self._workers: list[threading.Thread] = []
        self._busy: set[threading.Thread] = set()  # running a call
        self._counter = itertools.count(1)
        self._queue: queue.SimpleQueue[Call[Any] | None] = queue.SimpleQueue()
        # start() calls waiting for a thread, oldest first: each is given one in turn.
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def taken(self) -> int:
        """Threads given to a call, running or about to, abandoned ones included."""
        with self._lock:
            return self._taken

    @property
    def abandoned(self) -> int:
        """Threads still running a function whose attempt was given up."""
        with self._lock:
            return self._abandoned

    @property
    def free(self) -> int:
        with self._lock:
            return self._size - self._taken

    async def start(self, fn: Callable[[], R]) -> Call[R]:
        """Wait for a free thread and return once ``fn`` runs in it.

        If cancelled meanwhile, ``fn`` never runs and no thread stays taken.
        """
        await self._reserve()
        call = Call(self, fn)
        try:
            self._submit(call)
            await call._started
        except BaseException:
            call.abandon()
            raise
        return call

    def shutdown(self) -> None:
        """Let idle threads exit; busy ones exit when their function returns, unwaited for."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            idle = [t for t in workers if t not in self._busy]
        for _ in workers:
            self._queue.put(None)
        for thread in idle:
            thread.join(IDLE_JOIN_S)
        stuck = len(workers) - len(idle)
        if stuck:
            log.warning("executor threads still running at shutdown", extra={"threads": stuck})

    async def _reserve(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor threads are shut down")
            if self._taken < self._size and not self._waiters:
                self._taken += 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter  # resolved once _release handed us a thread
        except asyncio.CancelledError:
            with self._lock:
                queued = (loop, waiter) in self._waiters
                if queued:
                    self._waiters.remove((loop, waiter))
            # Handed a thread it will not use: pass it on. (If the waiter was
            # cancelled first, _hand_over passes it on.)
            if not queued and not waiter.cancelled():
                self._release()
            raise

    def _submit(self, call: Call[Any]) -> None:
        with self._lock:
            # One thread per taken slot, so that a queued call finds one at once.
            if len(self._workers) < self._taken:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{next(self._counter)}", daemon=True
                )
                thread.start()
                self._workers.append(thread)
        self._queue.put(call)

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            call = self._queue.get()
            if call is None:
                with self._lock:
                    self._workers.remove(me)
                return
            call._run()

    def _begin(self, call: Call[Any]) -> bool:
        with self._lock:
            if call._state is _State.DROPPED:
                return False
            call._state = _State.RUNNING
            self._busy.add(threading.current_thread())
            return True

    def _finish(self, call: Call[Any]) -> None:
        with self._lock:
            call._state = _State.DONE
            self._busy.discard(threading.current_thread())
            if call._abandoned:
                self._abandoned -= 1
        self._release()

    def _abandon(self, call: Call[Any]) -> None:
        with self._lock:
            if call._state is _State.QUEUED:
                call._state = _State.DROPPED  # its thread skips it
                release = True
            else:
                release = False
                if call._state is _State.RUNNING and not call._abandoned:
                    call._abandoned = True
                    self._abandoned += 1
        if release:
            self._release()

    def _release(self) -> None:
        """A thread is free: hand it to the oldest waiter, or count it free."""
        while True:
            with self._lock:
                if not self._waiters:
                    self._taken -= 1
                    return
                loop, waiter = self._waiters.popleft()
            try:
                loop.call_soon_threadsafe(_hand_over, waiter, self)
                return
            except RuntimeError:  # that waiter's loop is closed: try the next
                continue


def _hand_over(waiter: asyncio.Future[None], threads: Threads) -> None:
    if waiter.done():  # cancelled after it left the queue: pass the thread on
        threads._release()
    else:
        waiter.set_result(None)
