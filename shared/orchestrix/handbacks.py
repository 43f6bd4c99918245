"""The hand-back ledger: a worker that must exit while PostgreSQL is away leaves word
on NATS JetStream that its unfinished attempts are returned, not lost.

A stopping worker hands back what it could not finish (RUNNING -> PENDING, the
attempt not counted). When the database does not answer before the worker must
exit, the attempt would stay RUNNING, and the lifeline or the rescuer would
later take it back as a lost attempt: counted, and FAILED if it was the last.
Instead the worker publishes one message per such attempt to this stream, and
waits for JetStream's acknowledgement (it is stored). The scheduler that leads
maintenance applies the ledger before it looks for dead workers or expired
leases, so a returned attempt is handed back, not rescued.

The ledger is a second chance, never the record: an entry whose job has moved
on (its worker was not the one running it any more) changes nothing, because
the hand-back names the attempt and the worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from orchestrix.settings import NatsSettings

# A stored entry waits this long for a leader to apply it: far longer than any outage.
MAX_AGE_S = 7 * 86400.0


@dataclass(frozen=True)
class HandBack:
    job_id: str
    attempt: int
    worker_id: str

    def encode(self) -> bytes:
        return orjson.dumps({"job": self.job_id, "attempt": self.attempt, "worker": self.worker_id})

    @classmethod
    def decode(cls, data: bytes) -> HandBack:
        """Raises ValueError for anything that is not an entry."""
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        match body:
            case {"job": str(job_id), "attempt": int(attempt), "worker": str(worker_id)} if (
                attempt >= 1
            ):
                return cls(job_id, attempt, worker_id)
        raise ValueError("needs job (text), attempt (1 or more) and worker (text)")


def subject(settings: NatsSettings) -> str:
    return f"{settings.subject_prefix}.handbacks"


def stream_name(settings: NatsSettings) -> str:
    """One stream per subject prefix, so separate installations never share one."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", settings.subject_prefix).upper() + "_HANDBACKS"


def consumer_name(settings: NatsSettings) -> str:
    return stream_name(settings).lower() + "-applier"


def stream_config(settings: NatsSettings) -> StreamConfig:
    return StreamConfig(
        name=stream_name(settings),
        subjects=[subject(settings)],
        # An entry is gone once the leader has applied it.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=MAX_AGE_S,
    )


async def ensure_stream(js: JetStreamContext, settings: NatsSettings) -> None:
    """Create the ledger's stream, or bring an existing one to this configuration."""
    config = stream_config(settings)
    try:
        await js.stream_info(config.name or "")
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)
