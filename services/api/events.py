"""Routes for the jobs' history: ``/api/v1/jobs/{id}/events`` and the live ``/api/v1/events``.

Both read ``job_events`` (orchestrix.db.events). The live stream is
Server-Sent Events: one ``data:`` line of JSON per event, its ``id:`` the
event's position in the feed, so a client that reconnects with
``Last-Event-ID`` (browsers' EventSource do so by themselves) resumes right
after the last event it saw, without a gap or a repeat, for as long as the
events are kept. A quiet stream sends a comment line every
API_EVENTS_HEARTBEAT, so that proxies keep it open and a client notices a dead
one.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from orchestrix import ids
from orchestrix.db import events
from orchestrix.db import jobs as db
from orchestrix.db.events import EventFilter, Position
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.jobs import JOB_PATH
from orchestrix.services.api.keys import FEED, POOL
from orchestrix.services.api.parsing import QUEUE_PATTERN, TYPE_PATTERN, checked_name

log = logging.getLogger("api")
routes = web.RouteTableDef()
STREAM_PARAMS = frozenset({"job_id", "workflow_id", "queue", "type", "last_event_id"})


@routes.get(JOB_PATH + "/events")
async def job_events(request: web.Request) -> web.Response:
    """A job's state changes, oldest first."""
    job_id = request.match_info["id"]
    pool = request.app[POOL]
    if not ids.is_valid(job_id) or await db.get(pool, job_id) is None:
        raise ApiError(404, f"job {job_id} not found")
    return json_response({"events": [e.to_json() for e in await events.for_job(pool, job_id)]})


@routes.get("/api/v1/events")
async def stream(request: web.Request) -> web.StreamResponse:
    where, after = _parse_stream_query(request)
    feed = request.app[FEED]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    async with feed.subscribe(where, after) as subscription:
        await response.prepare(request)
        # A comment at once: the client knows the stream is open.
        await response.write(b": subscribed\n\n")
        try:
            while not feed.closed:
                batch = await subscription.next(feed.heartbeat_s)
                if batch:
                    await response.write(
                        b"".join(
                            b"id: %s\ndata: %s\n\n" % (e.cursor.encode(), orjson.dumps(e.to_json()))
                            for e in batch
                        )
                    )
                elif not feed.closed:
                    await response.write(b": heartbeat\n\n")
        except ConnectionResetError:
            pass  # the client went away
    return response


def _parse_stream_query(request: web.Request) -> tuple[EventFilter, Position | None]:
    query = request.query
    unknown = sorted(set(query) - STREAM_PARAMS)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")
    job_id, workflow_id = query.get("job_id"), query.get("workflow_id")
    if job_id is not None and not ids.is_valid(job_id):
        raise ApiError(400, f"job_id must be a job id (a ULID), got {job_id!r}")
    if workflow_id is not None and not ids.is_valid(workflow_id):
        raise ApiError(400, f"workflow_id must be a workflow id (a ULID), got {workflow_id!r}")
    queue = query.get("queue")
    job_type = query.get("type")
    where = EventFilter(
        job_id=job_id,
        workflow_id=workflow_id,
        queue=None if queue is None else checked_name("queue", queue, QUEUE_PATTERN),
        type=None if job_type is None else checked_name("type", job_type, TYPE_PATTERN),
    )
    last = request.headers.get("Last-Event-ID", query.get("last_event_id"))
    if last is None or last.strip() == "":
        return where, None
    position = events.parse_position(last)
    if position is None:
        raise ApiError(400, f"Last-Event-ID must be an event id such as 1234-56, got {last!r}")
    return where, position
