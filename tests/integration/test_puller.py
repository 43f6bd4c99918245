"""The worker's pull consumer against a real JetStream: it takes no more messages
than it asked for, and forgets requests JetStream has ended."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import nats
import pytest
from nats.aio.msg import Msg
from orchestrix import broker
from orchestrix.settings import NatsSettings, Settings

from services.worker import puller
from services.worker.puller import Puller


async def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_takes_what_it_asked_for_and_drops_expired_requests(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Requests that expire quickly, so the test sees JetStream end one.
    monkeypatch.setattr(puller, "EXPIRES_S", 1.0)
    monkeypatch.setattr(puller, "RENEW_BEFORE_S", 0.5)
    tag = uuid.uuid4().hex[:8]
    names = NatsSettings(
        servers=settings.nats.servers,
        stream=f"T_PULLER_{tag}",
        subject_prefix=f"tpuller.{tag}",
        consumer=f"tpuller-{tag}",
    )
    nc = await nats.connect(list(names.servers))
    js = nc.jetstream()
    received: list[Msg] = []

    async def on_message(msg: Msg) -> None:
        received.append(msg)

    try:
        await broker.ensure_consumer(js, names)
        for n in range(5):
            await js.publish(broker.subject(names, "q"), str(n).encode())
        ended: list[None] = []
        pull = Puller(nc, names.stream, names.consumer, on_message, lambda: ended.append(None))
        await pull.start()

        await pull.request(3)
        await _eventually(lambda: len(received) == 3)
        assert pull.outstanding == 0
        await asyncio.sleep(0.2)
        assert len(received) == 3  # no more than asked for

        await pull.request(10)
        await _eventually(lambda: len(received) == 5)
        assert pull.outstanding == 8  # the request stays open for 8 more
        renewal = pull.next_renewal_s()
        assert renewal is not None
        assert 0 < renewal <= 0.5
        # Half a second before it expires it stops counting: time to ask again.
        await asyncio.sleep(renewal + 0.05)
        assert pull.outstanding == 0
        assert not ended
        # JetStream ends it when it expires (a 408), and says so, before the
        # puller would give it up as lost (LOST_AFTER_S).
        await _eventually(lambda: len(ended) == 1, timeout_s=0.5 + puller.LOST_AFTER_S)
        assert pull.next_renewal_s() is None
        assert [m.data for m in received] == [str(n).encode() for n in range(5)]

        # A message published later reaches only an open request.
        await pull.request(1)
        await js.publish(broker.subject(names, "q"), b"late")
        await _eventually(lambda: len(received) == 6)
        assert received[-1].data == b"late"
        # A reconnect (as nats-py counts them) forgets the requests sent before.
        await pull.request(4)
        assert pull.outstanding == 4
        nc.stats["reconnects"] += 1
        assert pull.outstanding == 0
        for msg in received:
            await msg.ack()
        await pull.stop()
    finally:
        await js.delete_stream(names.stream)
        await nc.close()
