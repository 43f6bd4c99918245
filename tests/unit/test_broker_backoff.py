"""A service that starts while NATS restarts waits for JetStream instead of exiting."""

from __future__ import annotations

import asyncio

import pytest
from nats import errors as nats_errors
from orchestrix import broker


async def test_waits_out_jetstream_until_it_answers() -> None:
    calls = 0

    async def ensure() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats_errors.TimeoutError

    assert await broker.ensure_with_backoff(ensure, "stream", asyncio.Event())
    assert calls == 3


async def test_a_stop_ends_the_wait() -> None:
    stop = asyncio.Event()

    async def ensure() -> None:
        stop.set()
        raise nats_errors.NoRespondersError

    assert not await broker.ensure_with_backoff(ensure, "stream", stop)


async def test_an_error_waiting_cannot_fix_is_raised() -> None:
    async def ensure() -> None:
        raise ValueError("bad stream configuration")

    with pytest.raises(ValueError, match="bad stream"):
        await broker.ensure_with_backoff(ensure, "stream", asyncio.Event())
