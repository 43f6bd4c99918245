"""The history of every job: one ``job_events`` row per state change, and reading them back.

Writing: no state change happens without its event, because each statement that
moves jobs (in db.jobs, db.bulk, db.schedules) writes the events of the rows it
moved itself, as a CTE over its own ``RETURNING``: :func:`recorded` builds it.
One statement, so one transaction, and batched as the move is: a claim of 500
jobs writes 500 events in the same statement.

Reading: a job's events by id (in the order they happened to it), and the feed
of all events for ``GET /api/v1/events``, in (xid, id) order and only below the
oldest transaction still running (migration 0008 says why: nothing can commit
behind a reader's position later).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrix.models import rfc3339
from orchestrix.states import JobState

Conn = Any

# The name of the API key a request came with, on the connection that serves it
# (services/api/auth.py sets ``orchestrix.key`` for the session it holds; the
# pool's RESET ALL clears it when the connection goes back). NULL elsewhere.
REQUEST_KEY = "NULLIF(current_setting('orchestrix.key', true), '')"
# Who moved a job when the statement names no one: the API key of the request
# (``key:<name>``), else the session's application_name, which each service sets
# for its pool (``api:host:pid``, ...).
SESSION_ACTOR = (
    f"COALESCE('key:' || {REQUEST_KEY}, NULLIF(current_setting('application_name'), ''))"
)
# A worker's moves: the worker the row names, which its guard checked.
WORKER_ACTOR = f"COALESCE('worker:' || worker_id, {SESSION_ACTOR})"


# The benchmark's way to measure what history costs (bench/history.py): with
# `orchestrix.history` set to off for a database, its moves write no events. Not
# a setting for production: GET /api/v1/events and ?wait= read the events. One
# test of a constant per statement (a one-time filter), not per row.
_WRITING = "current_setting('orchestrix.history', true) IS DISTINCT FROM 'off'"


def recorded(
    source: str,
    *,
    from_state: str,
    attempt: str = "attempt",
    actor: str,
    name: str = "recorded",
    where: str = "true",
    at: str = "now()",
) -> str:
    """A CTE (named ``name``) writing one event per row of the CTE ``source`` (those
    ``where`` selects).

    ``source`` returns the moved jobs' ``id``, ``state`` (the new one),
    ``queue``, ``type``, ``workflow_id`` and what the expressions use; ``from_state``, ``attempt``
    and ``actor`` are SQL expressions over its rows; ``at`` is when the moves happened.
    """
    return f"""{name} AS (
    INSERT INTO job_events (job_id, from_state, to_state, attempt, actor, queue, type,
                            workflow_id, at)
    SELECT id, {from_state}, state, {attempt}, {actor}, queue, type, workflow_id, {at}
    FROM {source}
    WHERE {_WRITING} AND ({where})
)"""


@dataclass(frozen=True)
class Event:
    id: int
    xid: int
    job_id: str
    from_state: JobState | None
    to_state: JobState
    attempt: int
    at: datetime
    actor: str | None
    queue: str
    type: str
    workflow_id: str | None = None

    @property
    def position(self) -> Position:
        return (self.xid, self.id)

    @property
    def cursor(self) -> str:
        """The event's id in the feed (``Last-Event-ID``)."""
        return format_position(self.position)

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls(
            id=row["id"],
            xid=int(row["xid_text"]),
            job_id=row["job_id"],
            from_state=None if row["from_state"] is None else JobState(row["from_state"]),
            to_state=JobState(row["to_state"]),
            attempt=row["attempt"],
            at=row["at"],
            actor=row["actor"],
            queue=row["queue"],
            type=row["type"],
            workflow_id=row["workflow_id"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.cursor,
            "job_id": self.job_id,
            "from": None if self.from_state is None else self.from_state.value,
            "to": self.to_state.value,
            "attempt": self.attempt,
            "at": rfc3339(self.at),
            "by": self.actor,
            "queue": self.queue,
            "type": self.type,
            "workflow_id": self.workflow_id,
        }


# (xid, id): where an event sits in the feed.
Position = tuple[int, int]
START: Position = (0, 0)


def format_position(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


def parse_position(text: str) -> Position | None:
    """A feed position from its text (an event's ``id``); None if it is not one."""
    xid, sep, event_id = text.strip().partition("-")
    if not sep or not xid.isdigit() or not event_id.isdigit():
        return None
    position = (int(xid), int(event_id))
    return position if max(position) < 2**63 else None


_COLUMNS = (
    "id, xid::text AS xid_text, job_id, from_state, to_state, attempt, at, actor, queue, type,"
    " workflow_id"
)

_FOR_JOB = f"SELECT {_COLUMNS} FROM job_events WHERE job_id = $1 ORDER BY id"


async def for_job(conn: Conn, job_id: str) -> list[Event]:
    """A job's events, in the order they happened to it."""
    return [Event.from_row(row) for row in await conn.fetch(_FOR_JOB, job_id)]


# The feed past a position, up to (not including) the oldest transaction still
# running: every transaction below it has committed or rolled back, so no event
# can appear below it later.
_AFTER = f"""
SELECT {_COLUMNS} FROM job_events
WHERE (xid, id) > ($1::text::xid8, $2::bigint)
  AND xid < pg_snapshot_xmin(pg_current_snapshot())
  {{filters}}
ORDER BY xid, id
LIMIT $3
"""

_LAST = """
SELECT xid::text AS xid_text, id FROM job_events
WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY xid DESC, id DESC
LIMIT 1
"""


@dataclass(frozen=True)
class EventFilter:
    """Which events a reader wants: all of the fields given must match."""

    job_id: str | None = None
    queue: str | None = None
    type: str | None = None
    workflow_id: str | None = None

    def matches(self, event: Event) -> bool:
        return (
            (self.job_id is None or event.job_id == self.job_id)
            and (self.queue is None or event.queue == self.queue)
            and (self.type is None or event.type == self.type)
            and (self.workflow_id is None or event.workflow_id == self.workflow_id)
        )


async def after(
    conn: Conn,
    position: Position,
    *,
    limit: int,
    where: EventFilter | None = None,
    upto: Position | None = None,
) -> list[Event]:
    """Up to ``limit`` events of the feed past ``position`` (and not past ``upto``),
    in feed order, of those ``where`` selects."""
    clauses: list[str] = []
    args: list[Any] = [str(position[0]), position[1], limit]
    if upto is not None:
        args.extend((str(upto[0]), upto[1]))
        clauses.append("AND (xid, id) <= ($4::text::xid8, $5::bigint)")
    for column, value in (
        ("job_id", where and where.job_id),
        ("queue", where and where.queue),
        ("type", where and where.type),
        ("workflow_id", where and where.workflow_id),
    ):
        if value is not None:
            args.append(value)
            clauses.append(f"AND {column} = ${len(args)}")
    rows = await conn.fetch(_AFTER.format(filters=" ".join(clauses)), *args)
    return [Event.from_row(row) for row in rows]


async def last_position(conn: Conn) -> Position:
    """The position of the feed's newest readable event (START when there is none)."""
    row = await conn.fetchrow(_LAST)
    return START if row is None else (int(row["xid_text"]), row["id"])
