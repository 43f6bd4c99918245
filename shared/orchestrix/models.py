"""Jobs as typed values: what the API asks to create, and what a row holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrix.states import JobState

DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_SECONDS = 300
# JobState(value) goes through the enum machinery: 0.3 µs a row.
_STATES = {state.value: state for state in JobState}


@dataclass(frozen=True)
class NewJob:
    """A validated request to create a job. ``run_at`` None means now."""

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    run_at: datetime | None = None
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    rate_limit: str | None = None
    # The name of the API key that sent it (None with authentication off).
    created_by_key: str | None = None


@dataclass(frozen=True)
class Job:
    id: str
    type: str
    queue: str
    payload: Mapping[str, Any]
    state: JobState
    priority: int
    attempt: int
    max_attempts: int
    run_at: datetime
    timeout_seconds: int
    idempotency_key: str | None
    last_error: str | None
    errors: list[Mapping[str, Any]]
    result: Any
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    cancel_requested_at: datetime | None = None
    worker_id: str | None = None
    handoffs: int = 0
    schedule: str | None = None
    tick_at: datetime | None = None
    progress: Any = None
    progress_at: datetime | None = None
    # A workflow's job: the workflow, the job's key in it, how many of its parents
    # have not SUCCEEDED yet (WAITING while above 0), and the job whose failure or
    # cancellation cancelled it.
    workflow_id: str | None = None
    workflow_key: str | None = None
    waiting_for: int = 0
    cancelled_by: str | None = None
    # At most the queue's key_limit jobs with this key run at once.
    concurrency_key: str | None = None
    # The rate limit (db.rate_limits) each start of this job counts against.
    rate_limit: str | None = None
    # The names of the API keys that created it and that cancelled it (or asked
    # for its cancel); None with authentication off, or when no key did.
    created_by_key: str | None = None
    cancelled_by_key: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        # Filled in without __init__: a frozen dataclass sets each of its 20 fields
        # through object.__setattr__, 3 µs a job, a tenth of the API's CPU on a
        # batch create. Every field is set here, so no default is skipped.
        job = object.__new__(cls)
        job.__dict__.update(
            id=row["id"],
            type=row["type"],
            queue=row["queue"],
            payload=row["payload"],
            state=_STATES[row["state"]],
            priority=row["priority"],
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            run_at=row["run_at"],
            timeout_seconds=row["timeout_seconds"],
            idempotency_key=row["idempotency_key"],
            last_error=row["last_error"],
            errors=row["errors"],
            result=row["result"],
            created_at=row["created_at"],
            scheduled_at=row["scheduled_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            updated_at=row["updated_at"],
            cancel_requested_at=row["cancel_requested_at"],
            worker_id=row["worker_id"],
            handoffs=row["handoffs"],
            schedule=row["schedule"],
            tick_at=row["tick_at"],
            progress=row["progress"],
            progress_at=row["progress_at"],
            workflow_id=row["workflow_id"],
            workflow_key=row["workflow_key"],
            waiting_for=row["waiting_for"],
            cancelled_by=row["cancelled_by"],
            concurrency_key=row["concurrency_key"],
            rate_limit=row["rate_limit"],
            created_by_key=row["created_by_key"],
            cancelled_by_key=row["cancelled_by_key"],
        )
        return job

    def to_json(self) -> dict[str, Any]:
        """The job as the REST API shows it: RFC 3339 UTC timestamps."""
        return {
            "id": self.id,
            "type": self.type,
            "queue": self.queue,
            "state": self.state.value,
            "payload": self.payload,
            "priority": self.priority,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "timeout_seconds": self.timeout_seconds,
            "idempotency_key": self.idempotency_key,
            "run_at": rfc3339(self.run_at),
            "result": self.result,
            "last_error": self.last_error,
            "errors": self.errors,
            "created_at": rfc3339(self.created_at),
            "scheduled_at": rfc3339(self.scheduled_at),
            "started_at": rfc3339(self.started_at),
            "completed_at": rfc3339(self.completed_at),
            "updated_at": rfc3339(self.updated_at),
            "cancel_requested_at": rfc3339(self.cancel_requested_at),
            "worker_id": self.worker_id,
            "handoffs": self.handoffs,
            "schedule": self.schedule,
            "tick_at": rfc3339(self.tick_at),
            "progress": self.progress,
            "progress_at": rfc3339(self.progress_at),
            "workflow_id": self.workflow_id,
            "workflow_key": self.workflow_key,
            "waiting_for": self.waiting_for,
            "cancelled_by": self.cancelled_by,
            "concurrency_key": self.concurrency_key,
            "rate_limit": self.rate_limit,
            "created_by_key": self.created_by_key,
            "cancelled_by_key": self.cancelled_by_key,
        }


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        # asyncpg reads timestamptz -infinity / infinity (what it writes for
        # datetime.min / max, e.g. a run_at of 0001-01-01T00:00:00Z) as naive values.
        moment = moment.replace(tzinfo=UTC)
    if moment.tzinfo is UTC:  # as asyncpg reads every timestamptz
        return _utc_text(moment)
    return _format(moment)


def _format(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


# The last UTC time formatted, and its text. Rows written by one statement share
# their now(): the 1,000 jobs of a batch have one created_at, run_at and updated_at,
# formatted once instead of 3,000 times. One tuple, replaced whole, so a reader
# never pairs a time with another's text.
_last_utc: tuple[datetime, str] = (datetime.min.replace(tzinfo=UTC), "0001-01-01T00:00:00.000000Z")


def _utc_text(moment: datetime) -> str:
    global _last_utc
    last = _last_utc
    if last[0] == moment:  # both UTC: equal instants, same text
        return last[1]
    text = _format(moment)
    _last_utc = (moment, text)
    return text
