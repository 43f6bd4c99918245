"""One reader of the jobs' events per API process, shared by everyone who listens.

``GET /api/v1/events`` (a Server-Sent Events stream) and ``GET
/api/v1/jobs/{id}?wait=`` both listen here. However many listeners there are,
the API reads ``job_events`` once: :meth:`Feed.run_once` reads the events past
its position (db.events.after: in feed order, below the oldest running
transaction) and hands each to the subscriptions it matches, found by job id,
workflow, type or queue, so an event costs nothing for the listeners it does not concern.
With no one listening, the feed does not read at all.

A subscription never misses an event and never gets one twice. When it starts
(or falls behind: more than ``MAX_QUEUED`` undelivered events), it reads what
it missed from the table, up to the position the feed had reached when it
subscribed, and then takes the events the feed handed it, all past that
position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from orchestrix.db import events, jobs
from orchestrix.db.events import Event, EventFilter, Position
from orchestrix.db.pool import TRANSIENT
from orchestrix.models import Job
from orchestrix.states import TERMINAL

log = logging.getLogger("api")
# Events read per query of the table.
BATCH = 1000
# A subscription whose listener is this far behind goes back to reading the table.
MAX_QUEUED = 10_000


class Subscription:
    """A listener's events, in feed order, past ``position``."""

    def __init__(self, feed: Feed, where: EventFilter, position: Position | None) -> None:
        self._feed = feed
        self.where = where
        self.position = position  # of the last event given to the listener
        self._live: deque[Event] = deque()
        self._arrived = asyncio.Event()
        # Events up to here are the table's to give; the feed hands those past it.
        self._handover: Position | None = None
        self.behind = False

    def offer(self, event: Event) -> None:
        """From the feed: the next event, in feed order (past the handover position
        once started)."""
        if self._handover is None or self.behind:
            return  # not started, or reading the table: it has this event too
        if len(self._live) >= MAX_QUEUED:
            self.behind = True  # read the table again from self.position
            self._live.clear()
        else:
            self._live.append(event)
        self._arrived.set()

    def start(self, handover: Position) -> None:
        """Take the events the feed hands out from now on: those past ``handover``."""
        self._handover = handover
        self.behind = False
        if self.position is None:  # only what comes from now on
            self.position = handover

    async def next(self, idle_s: float) -> list[Event]:
        """The next events for the listener; an empty list after ``idle_s`` without
        any, or at once when the feed has closed."""
        while not self._feed.closed:
            if self.behind:
                self.start(self._feed.position)
            assert self._handover is not None
            assert self.position is not None
            if self.position < self._handover:
                missed = await events.after(
                    self._feed.pool,
                    self.position,
                    limit=BATCH,
                    where=self.where,
                    upto=self._handover,
                )
                if len(missed) < BATCH:  # all of them, up to the handover
                    self.position = self._handover
                if missed:
                    self.position = max(self.position, missed[-1].position)
                    return missed
                continue
            fresh = list(self._take())  # all past the handover, so past self.position
            if fresh:
                self.position = fresh[-1].position
                return fresh
            if self.behind:
                continue
            self._arrived.clear()
            try:
                async with asyncio.timeout(idle_s):
                    await _first(self._arrived, self._feed.stopping)
            except TimeoutError:
                return []
        return []

    def _take(self) -> Iterator[Event]:
        while self._live:
            yield self._live.popleft()


class Feed:
    def __init__(self, pool: Any, *, poll_interval_s: float, heartbeat_s: float) -> None:
        self.pool = pool
        self._poll_s = poll_interval_s
        self.heartbeat_s = heartbeat_s  # how long a quiet stream waits to say it is alive
        # The last event read; None while no one listens (nothing is read then).
        self._position: Position | None = None
        self._ready = asyncio.Event()
        self._wanted = asyncio.Event()
        self._subscriptions: set[Subscription] = set()
        # Subscriptions by the most selective field of their filter.
        self._by_job: dict[str, set[Subscription]] = {}
        self._by_workflow: dict[str, set[Subscription]] = {}
        self._by_type: dict[str, set[Subscription]] = {}
        self._by_queue: dict[str, set[Subscription]] = {}
        self._unfiltered: set[Subscription] = set()
        self.stopping = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.stopping.is_set()

    def close(self) -> None:
        """Stop reading, and end every listener's wait (the API is shutting down)."""
        self.stopping.set()

    @property
    def listeners(self) -> int:
        return len(self._subscriptions)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, where: EventFilter, after: Position | None = None
    ) -> AsyncIterator[Subscription]:
        """Listen for the events ``where`` selects past ``after`` (None: from now on)."""
        subscription = Subscription(self, where, after)
        self._subscriptions.add(subscription)
        self._index(subscription).add(subscription)
        self._wanted.set()
        try:
            await self._ready.wait()
            subscription.start(self.position)
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            self._index(subscription).discard(subscription)

    def _index(self, subscription: Subscription) -> set[Subscription]:
        where = subscription.where
        for value, index in (
            (where.job_id, self._by_job),
            (where.workflow_id, self._by_workflow),
            (where.type, self._by_type),
            (where.queue, self._by_queue),
        ):
            if value is not None:
                return index.setdefault(value, set())
        return self._unfiltered

    @property
    def position(self) -> Position:
        """The last event read (only while anyone listens)."""
        assert self._position is not None
        return self._position

    async def run_once(self) -> int:
        """Read the events past the feed's position and hand them out; how many."""
        if self._position is None:
            self._position = await events.last_position(self.pool)
            self._ready.set()
            return 0
        batch = await events.after(self.pool, self._position, limit=BATCH)
        # No await from here on: a subscription starting now sees the position
        # and the events handed out agree.
        for event in batch:
            for index, key in (
                (self._by_job, event.job_id),
                (self._by_workflow, event.workflow_id or ""),
                (self._by_type, event.type),
                (self._by_queue, event.queue),
            ):
                for subscription in index.get(key, ()):
                    if subscription.where.matches(event):
                        subscription.offer(event)
            for subscription in self._unfiltered:
                subscription.offer(event)
        if batch:
            self._position = batch[-1].position
        return len(batch)

    async def run(self) -> None:
        """Read while anyone listens, every ``poll_interval_s`` (at once after a full
        batch), until closed."""
        stop = self.stopping
        while not stop.is_set():
            if not self._subscriptions:
                self._position = None
                self._ready.clear()
                self._wanted.clear()
                await _first(self._wanted, stop)
                continue
            try:
                read = await self.run_once()
            except TRANSIENT as exc:
                log.warning("events not read; retrying", extra={"error": repr(exc)})
                read = 0
            if read < BATCH:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_s):
                        await stop.wait()


async def _first(*flags: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(flag.wait()) for flag in flags]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def until_finished(feed: Feed, job: Job, wait_s: float) -> Job:
    """The job once it has finished, or as it is after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    async with feed.subscribe(EventFilter(job_id=job.id)) as subscription:
        # Read again now that every later change will be heard of.
        latest = await jobs.get(feed.pool, job.id)
        while latest is not None and latest.state not in TERMINAL and not feed.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batch = await subscription.next(left)
            if any(event.to_state in TERMINAL for event in batch):
                latest = await jobs.get(feed.pool, job.id)
    return job if latest is None else latest
