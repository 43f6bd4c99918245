from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from orchestrix.broker import Announcement, consumer_config, stream_config, subject
from orchestrix.settings import NatsSettings


def test_announcement_round_trip_and_msg_id() -> None:
    message = Announcement("01KG94QDSXNW96W84543ZG5PY5", 2)
    assert Announcement.decode(message.encode()) == message
    announced = datetime(2026, 1, 31, 9, 54, 37, 123456, tzinfo=UTC)
    assert message.msg_id(announced) == "01KG94QDSXNW96W84543ZG5PY5:2:1769853277123456"
    # A republish is a new announcement: a new id, which JetStream must not drop.
    later = announced + timedelta(microseconds=1)
    assert message.msg_id(later) != message.msg_id(announced)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"[]",
        b'{"id": 1, "attempt": 1}',
        b'{"id": "x"}',
        b'{"id": "x", "attempt": 0}',
    ],
)
def test_decode_refuses_anything_else(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        Announcement.decode(data)


def test_names_follow_the_settings() -> None:
    nats = NatsSettings(stream="S1", subject_prefix="a.b", consumer="c1")
    assert subject(nats, "emails") == "a.b.emails"
    assert stream_config(nats).subjects == ["a.b.>"]
    assert consumer_config(nats).durable_name == "c1"
    assert consumer_config(nats).filter_subject == "a.b.>"
