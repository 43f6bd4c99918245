from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from orchestrix.broker import (
    MAX_JOBS_PER_MESSAGE,
    Announcement,
    consumer_config,
    stream_config,
    subject,
)
from orchestrix.db.jobs import Claimed
from orchestrix.settings import NatsSettings

from services.scheduler.publisher import messages

ANNOUNCED = datetime(2026, 1, 31, 9, 54, 37, 123456, tzinfo=UTC)


def test_announcement_round_trip_and_msg_id() -> None:
    message = Announcement((("01KG94QDSXNW96W84543ZG5PY5", 2), ("01KG94QDSXNW96W84543ZG5PY6", 1)))
    assert Announcement.decode(message.encode()) == message
    assert message.msg_id(ANNOUNCED) == "01KG94QDSXNW96W84543ZG5PY5:2:1769853277123456:2"
    # A republish is a new announcement: a new id, which JetStream must not drop.
    later = ANNOUNCED + timedelta(microseconds=1)
    assert message.msg_id(later) != message.msg_id(ANNOUNCED)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"[]",
        b'{"id": "x", "attempt": 1}',
        b'{"jobs": []}',
        b'{"jobs": "x"}',
        b'{"jobs": [["x"]]}',
        b'{"jobs": [[1, 1]]}',
        b'{"jobs": [["x", 0]]}',
        b'{"jobs": [["x", "1"]]}',
        b'{"jobs": [["x", 1, 2]]}',
        b'{"jobs": [["x", 1], {"id": "y", "attempt": 1}]}',
        b'{"jobs": [' + b",".join([b'["x", 1]'] * (MAX_JOBS_PER_MESSAGE + 1)) + b"]}",
    ],
)
def test_decode_refuses_anything_else(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        Announcement.decode(data)


def _claimed(count: int, queue: str) -> list[Claimed]:
    return [Claimed(f"{queue}-{n:04d}", queue, 1, ANNOUNCED) for n in range(count)]


def test_a_claim_is_split_by_queue_into_even_messages() -> None:
    a, b = _claimed(260, "a"), _claimed(3, "b")
    jobs = [job for pair in zip(a, b, strict=False) for job in pair] + a[3:]
    out = messages(jobs, per_message=50)
    assert [(m.queue, len(m.jobs)) for m in out] == [
        ("a", 44),
        ("a", 44),
        ("a", 43),
        ("a", 43),
        ("a", 43),
        ("a", 43),
        ("b", 3),
    ]
    # Every job once, in claim order within its queue.
    assert [job for m in out if m.queue == "a" for job in m.jobs] == a
    assert [job.id for job in out[-1].jobs] == ["b-0000", "b-0001", "b-0002"]
    assert out[0].announcement.attempts[0] == ("a-0000", 1)
    assert messages(jobs, per_message=1000)[0].jobs == tuple(a)
    assert messages([], per_message=50) == []


def test_names_follow_the_settings() -> None:
    nats = NatsSettings(stream="S1", subject_prefix="a.b", consumer="c1")
    assert subject(nats, "emails") == "a.b.emails"
    assert stream_config(nats).subjects == ["a.b.>"]
    assert stream_config(nats).num_replicas == 1
    assert stream_config(NatsSettings(stream_replicas=3)).num_replicas == 3
    assert consumer_config(nats).durable_name == "c1"
    assert consumer_config(nats).filter_subject == "a.b.>"
