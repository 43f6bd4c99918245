"""A pull consumer that keeps requests outstanding, so messages arrive as soon as
they are published instead of when the worker next asks.

nats-py's ``fetch()`` asks for a batch, waits for it and returns: between two
fetches nothing is on its way, and a batch that fills slowly holds back the
messages that did come. Here the worker says how many more messages it can take
(``request``); the pull request goes to JetStream at once and stays there,
and each message is handed to the callback the moment it arrives.

Each request asks for up to ``n`` messages and expires after ``EXPIRES_S``;
JetStream serves requests in the order they came. The puller counts what each
request may still bring, so the worker never asks for much more than it can
hold: a message uses up the oldest request, and a request ends when JetStream
says so (a 408 or 409 status), when the connection to NATS is re-established
(a restarted server forgets its requests), or at the latest shortly after it
expired. A request stops counting
``RENEW_BEFORE_S`` before it expires, so that the worker asks again in time
and there is never a moment with no request open.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header, StatusCode

log = logging.getLogger("worker")

EXPIRES_S = 5.0
# Ask again this long before a request expires.
RENEW_BEFORE_S = 1.0
# After JetStream refuses a request, wait this long before asking again.
REFUSED_PAUSE_S = 1.0
# A request JetStream has not closed this long after it expired is taken as lost.
LOST_AFTER_S = 1.0
NO_LIMIT = -1


@dataclass
class _Request:
    remaining: int
    renew_at: float  # from then on it no longer counts: time to ask again
    lost_at: float  # JetStream has surely ended it by then


class Puller:
    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        on_message: Callable[[Msg], Awaitable[None]],
        on_request_ended: Callable[[], None],
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._on_message = on_message
        self._on_request_ended = on_request_ended
        self._inbox = nc.new_inbox()
        self._requests: deque[_Request] = deque()
        self._sub: Subscription | None = None
        self._paused_until = 0.0
        self._reconnects = nc.stats["reconnects"]

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            self._inbox,
            cb=self._received,
            pending_msgs_limit=NO_LIMIT,
            pending_bytes_limit=NO_LIMIT,
        )

    async def stop(self) -> None:
        """Take no more messages; a message still on its way is redelivered after its ack wait."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        self._requests.clear()

    @property
    def outstanding(self) -> int:
        """Messages the open requests, not yet due for renewal, may still bring."""
        if self._nc.stats["reconnects"] != self._reconnects:
            # Requests went to a connection (perhaps a server) that is gone.
            self._reconnects = self._nc.stats["reconnects"]
            self._requests.clear()
        now = time.monotonic()
        while self._requests and (
            self._requests[0].remaining <= 0 or self._requests[0].lost_at <= now
        ):
            self._requests.popleft()
        return sum(r.remaining for r in self._requests if r.renew_at > now)

    def next_renewal_s(self) -> float | None:
        """Seconds until an open request stops counting; None when none is open."""
        due = [r.renew_at for r in self._requests if r.remaining > 0]
        return max(0.0, min(due) - time.monotonic()) if due else None

    async def request(self, count: int) -> None:
        """Ask JetStream for up to ``count`` more messages (not for a moment after a refusal)."""
        now = time.monotonic()
        if now < self._paused_until:
            return
        body = {"batch": count, "expires": int(EXPIRES_S * 1_000_000_000)}
        await self._nc.publish(self._subject, orjson.dumps(body), reply=self._inbox)
        self._requests.append(
            _Request(count, now + EXPIRES_S - RENEW_BEFORE_S, now + EXPIRES_S + LOST_AFTER_S)
        )

    async def _received(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get(Header.STATUS)
        if status is None:
            self._use_one()
            await self._on_message(msg)
            return
        if status == StatusCode.CONTROL_MESSAGE:
            return  # a heartbeat; we ask for none
        # 408: the oldest request expired; 409: JetStream refused or ended it
        # (e.g. the consumer was deleted, or too many requests wait).
        if status != StatusCode.REQUEST_TIMEOUT:
            self._paused_until = time.monotonic() + REFUSED_PAUSE_S
            log.warning(
                "pull request ended",
                extra={"status": status, "description": headers.get(Header.DESCRIPTION)},
            )
        while self._requests and self._requests[0].remaining <= 0:
            self._requests.popleft()  # used up: JetStream says nothing of those
        if self._requests:
            self._requests.popleft()
        self._on_request_ended()

    def _use_one(self) -> None:
        for request in self._requests:
            if request.remaining > 0:
                request.remaining -= 1
                return
