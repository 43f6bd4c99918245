"""``POST /api/v1/jobs/cancel`` and ``POST /api/v1/jobs/retry``: one action on many jobs.

The body selects the jobs: ``ids`` (up to IDS_MAX) and/or filters (``state``,
``type``, ``queue``, ``created_after``, ``created_before``), all of which must
hold; at least one is required, so an empty body changes nothing. The work is
done in chunks (orchestrix.db.bulk) that never stall the workers' claims.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from orchestrix import broker, ids
from orchestrix.db import bulk as db
from orchestrix.services.api import auth
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.keys import LIFECYCLE, NATS_SETTINGS
from orchestrix.services.api.parsing import (
    QUEUE_PATTERN,
    TYPE_PATTERN,
    checked_name,
    optional_time,
    read_json_object,
)
from orchestrix.states import JobState

log = logging.getLogger("api")
routes = web.RouteTableDef()

IDS_MAX = 10_000
SELECTION_FIELDS = frozenset({"ids", "state", "type", "queue", "created_after", "created_before"})
# The states each action applies to; a state filter outside them is refused.
CANCEL_STATES = (JobState.PENDING, JobState.WAITING, JobState.RETRYING, JobState.RUNNING)
RETRY_STATES = (JobState.FAILED, JobState.CANCELLED)


@routes.post("/api/v1/jobs/cancel")
async def cancel_jobs(request: web.Request) -> web.Response:
    """Waiting jobs are CANCELLED at once; running ones are asked of their workers."""
    selection = parse_selection(await read_json_object(request), CANCEL_STATES)
    return json_response(await cancel_selected(request, selection))


async def cancel_selected(request: web.Request, selection: db.Selection) -> dict[str, int]:
    """Cancel what ``selection`` picks: the waiting jobs at once, the running ones
    through their workers; the counts, as the API answers them."""
    # The connection names the request's key: the jobs' cancelled_by_key, their events.
    async with auth.connection(request) as conn:
        cancelled, asked = await db.cancel(conn, selection, lambda: auth.spare_connection(request))
    nc = request.app[LIFECYCLE].nats
    if asked and nc is not None and nc.is_connected:
        # Fire and forget, as for one job: a worker that misses it sees the request
        # at its next lease renewal.
        subject = broker.cancel_subject(request.app[NATS_SETTINGS])
        with contextlib.suppress(Exception):
            for job_id in asked:
                await nc.publish(subject, job_id.encode())
    log.info("jobs cancelled in bulk", extra={"cancelled": cancelled, "requested": len(asked)})
    return {"cancelled": cancelled, "cancel_requested": len(asked)}


@routes.post("/api/v1/jobs/retry")
async def retry_jobs(request: web.Request) -> web.Response:
    """FAILED and CANCELLED jobs become PENDING with a new budget of attempts."""
    selection = parse_selection(await read_json_object(request), RETRY_STATES)
    async with auth.connection(request) as conn:
        retried = await db.retry(conn, selection, lambda: auth.spare_connection(request))
    log.info("jobs retried in bulk", extra={"retried": retried})
    return json_response({"retried": retried})


def parse_selection(data: Mapping[str, Any], allowed: tuple[JobState, ...]) -> db.Selection:
    unknown = sorted(set(data) - SELECTION_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    if not data:
        raise ApiError(
            400, f"select the jobs: give at least one of {', '.join(sorted(SELECTION_FIELDS))}"
        )
    nulls = sorted(field for field, value in data.items() if value is None)
    if nulls:
        # A null filter must not widen the selection to every job.
        raise ApiError(400, f"{', '.join(nulls)}: null is not a selection; leave it out")
    job_ids = data.get("ids")
    if job_ids is not None and (
        not isinstance(job_ids, list)
        or not 1 <= len(job_ids) <= IDS_MAX
        or not all(isinstance(i, str) and ids.is_valid(i) for i in job_ids)
    ):
        raise ApiError(400, f"ids must be an array of 1 to {IDS_MAX} job ids")
    states = None
    if "state" in data:
        value = data["state"]
        names = {s.value: s for s in allowed}
        if not isinstance(value, str) or value not in names:
            raise ApiError(400, f"state must be one of {', '.join(names)} for this action")
        states = [names[value]]
    return db.Selection(
        ids=job_ids,
        states=states,
        type=None if data.get("type") is None else checked_name("type", data["type"], TYPE_PATTERN),
        queue=(
            None
            if data.get("queue") is None
            else checked_name("queue", data["queue"], QUEUE_PATTERN)
        ),
        created_after=optional_time("created_after", data.get("created_after")),
        created_before=optional_time("created_before", data.get("created_before")),
    )
