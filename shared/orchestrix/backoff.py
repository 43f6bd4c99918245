"""Waiting out a dependency that is not there yet, without spinning and without giving up.

A service started beside its database or broker (compose, Kubernetes) should
wait for them rather than crash-loop; a stop request ends the wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("backoff")


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep for ``seconds`` or until ``stop`` is set; True when stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def until_connected(
    connect: Callable[[], Awaitable[T]],
    *,
    what: str,
    stop: asyncio.Event,
    retry_on: tuple[type[BaseException], ...],
    first_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
) -> T | None:
    """Call ``connect`` until it succeeds (its result) or ``stop`` is set (None).

    Only the errors in ``retry_on`` are waited out; any other (a wrong password,
    a missing database) is raised, since waiting cannot fix it.
    """
    delay = first_delay_s
    while not stop.is_set():
        try:
            return await connect()
        except retry_on as exc:
            log.warning(
                f"{what} not reachable; retrying",
                extra={"error": repr(exc), "retry_in_s": round(delay, 2)},
            )
        if await sleep_unless_stopped(stop, delay):
            break
        delay = min(delay * 2, max_delay_s)
    return None
