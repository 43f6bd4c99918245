"""Routes for ``/api/v1/queues``: what waits and runs in each queue, pause and resume.

A paused queue's jobs are not claimed by any worker from the next claim on (the
claim reads the ``queues`` table); the jobs already running finish. Creating
jobs in a paused queue still works: they wait. Resuming wakes the workers.
"""

from __future__ import annotations

import logging

from aiohttp import web
from orchestrix.db import queues as db
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.keys import POOL
from orchestrix.services.api.parsing import (
    QUEUE_PATTERN,
    checked_int,
    checked_name,
    read_json_object,
)

log = logging.getLogger("api")
routes = web.RouteTableDef()
QUEUE_PATH = "/api/v1/queues/{queue}"
KEY_LIMIT_RANGE = (1, 100_000)
RUNNING_LIMIT_RANGE = (1, 1_000_000)
LIMITS = {"key_limit": KEY_LIMIT_RANGE, "running_limit": RUNNING_LIMIT_RANGE}


@routes.get("/api/v1/queues")
async def list_queues(request: web.Request) -> web.Response:
    queues = await db.overview(request.app[POOL])
    return json_response({"queues": [queue.to_json() for queue in queues]})


@routes.get(QUEUE_PATH)
async def get_queue(request: web.Request) -> web.Response:
    return json_response((await _existing(request, _name(request))).to_json())


@routes.patch(QUEUE_PATH)
async def change_queue(request: web.Request) -> web.Response:
    """``{"key_limit": n, "running_limit": m}``, either or both: at most n jobs of
    one concurrency key (null: 1), at most m jobs of the queue (null: no limit)
    run at once, fleet-wide."""
    name = _name(request)
    data = await read_json_object(request)
    if not data or set(data) - LIMITS.keys():
        raise ApiError(
            400,
            'the body must be {"key_limit": n, "running_limit": m}, either or both: '
            "n from 1 to 100000, m from 1 to 1000000, or null",
        )
    limits = {
        field: None if data[field] is None else checked_int(field, data[field], LIMITS[field])
        for field in data
    }
    await db.set_limits(request.app[POOL], name, **limits)
    log.info("queue limits set", extra={"queue": name, **limits})
    return json_response((await _existing(request, name)).to_json())


@routes.post(QUEUE_PATH + "/pause")
async def pause_queue(request: web.Request) -> web.Response:
    # Any well-formed name: a queue may be paused before its first job arrives.
    name = _name(request)
    await db.pause(request.app[POOL], name)
    log.info("queue paused", extra={"queue": name})
    return json_response((await _existing(request, name)).to_json())


@routes.post(QUEUE_PATH + "/resume")
async def resume_queue(request: web.Request) -> web.Response:
    name = _name(request)
    if await db.resume(request.app[POOL], name):
        log.info("queue resumed", extra={"queue": name})
    return json_response((await _existing(request, name)).to_json())


def _name(request: web.Request) -> str:
    return checked_name("queue", request.match_info["queue"], QUEUE_PATTERN)


async def _existing(request: web.Request, name: str) -> db.Queue:
    found = await db.overview(request.app[POOL], name)
    if not found:
        raise ApiError(404, f"queue {name} not found: no job names it and it was never paused")
    return found[0]
