"""Routes for ``/api/v1/jobs`` and ``/api/v1/stats``."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

import orjson
from aiohttp import web
from orchestrix import broker, ids
from orchestrix.db import counts as job_counts
from orchestrix.db import jobs as db
from orchestrix.db import workers, workflows
from orchestrix.models import Job
from orchestrix.services.api import auth
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.feed import until_finished
from orchestrix.services.api.keys import (
    CREATOR,
    FEED,
    LIFECYCLE,
    LIST_MAX_BYTES,
    METRICS,
    NATS_SETTINGS,
    POOL,
)
from orchestrix.services.api.parsing import (
    parse_batch,
    parse_list_query,
    parse_new_job,
    parse_wait,
    read_json_object,
)
from orchestrix.services.api.rate_limits import check_known
from orchestrix.states import CLAIMABLE, TERMINAL, JobState

log = logging.getLogger("api")
# A list that includes large fields reads this many jobs at a time.
LARGE_CHUNK = 20
_PAGE_START = b'{"jobs":['
_PAGE_END = b'],"next_cursor":'
_CURSOR_BYTES = len(b'"01ARZ3NDEKTSV4RRFFQ69G5FAV"}')
# /api/v1/stats names at most this many types waiting for an executor.
STATS_TYPES_MAX = 20
routes = web.RouteTableDef()
# Any id but "batch", "cancel" and "retry", which are resources of their own: a
# 405 on /api/v1/jobs/batch must not advertise this route's GET and DELETE.
JOB_PATH = r"/api/v1/jobs/{id:(?!(?:batch|cancel|retry)/?$)[^{}/]+}"


@routes.post("/api/v1/jobs")
async def create_job(request: web.Request) -> web.Response:
    new = parse_new_job(await read_json_object(request), auth.key_name(request))
    auth.charge_jobs(request, 1)
    if new.rate_limit is not None:
        await check_known(request.app[POOL], [new])
    # Inserted together with the creates of concurrent requests (see creator.py).
    job, created = await request.app[CREATOR].create(new)
    if not created:
        return json_response(job.to_json(), status=200)
    metrics = request.app[METRICS]
    metrics.jobs_created.labels(*metrics.known.job(job.type, job.queue)).inc()
    log.debug("job created", extra={"job_id": job.id, "type": job.type, "queue": job.queue})
    return json_response(job.to_json(), status=201)


@routes.post("/api/v1/jobs/batch")
async def create_jobs(request: web.Request) -> web.Response:
    """Up to 1,000 jobs in one request and one statement: all are created, or none."""
    batch = parse_batch(await read_json_object(request), auth.key_name(request))
    auth.charge_jobs(request, len(batch))
    await check_known(request.app[POOL], batch)
    results = await db.insert_many(request.app[POOL], batch)
    created = request.app[METRICS].count_created(job for job, new in results if new)
    log.info("jobs created in a batch", extra={"jobs": created})
    return json_response(
        {"jobs": [job.to_json() for job, _ in results], "created": created}, status=201
    )


@routes.get("/api/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    """A page of jobs, newest first: at most ``limit`` jobs and, but for its first
    job, at most API_LIST_MAX_BYTES of body.

    Without ``?include=`` the large fields are not even read; with it, the jobs
    are read a few at a time, so that a page of megabyte payloads never holds more
    than ``LARGE_CHUNK`` of them in memory beyond the page itself.
    """
    query = parse_list_query(request.query)
    omitted = [name for name in db.LARGE_FIELDS if name not in query.include]
    budget = request.app[LIST_MAX_BYTES] - len(_PAGE_START) - len(_PAGE_END) - _CURSOR_BYTES
    chunk = query.limit + 1 if not query.include else min(query.limit + 1, LARGE_CHUNK)
    pieces: list[bytes] = []
    size = 0
    before = query.cursor
    more = False
    while True:
        jobs = await db.list_jobs(
            request.app[POOL], query.where, limit=chunk, before=before, include=query.include
        )
        for job in jobs:
            if len(pieces) == query.limit:
                more = True
                break
            shown = job.to_json()
            for name in omitted:
                del shown[name]
            piece = orjson.dumps(shown)
            if pieces and size + 1 + len(piece) > budget:
                more = True
                break
            pieces.append(piece)
            size += len(piece) + (1 if len(pieces) > 1 else 0)
            before = job.id
        else:
            if len(jobs) == chunk:  # there may be more: read the next few
                continue
        break
    cursor = orjson.dumps(before if more else None)
    body = _PAGE_START + b",".join(pieces) + _PAGE_END + cursor + b"}"
    return web.Response(body=body, content_type="application/json")


@routes.get(JOB_PATH)
async def get_job(request: web.Request) -> web.Response:
    """The job; with ``?wait=30s``, answered as soon as it finishes, or after 30 s."""
    wait_s = parse_wait(request.query)
    job = await _existing(request)
    if wait_s > 0 and job.state not in TERMINAL:
        job = await until_finished(request.app[FEED], job, wait_s)
    return json_response(job.to_json())


@routes.delete(JOB_PATH)
async def cancel_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    # The connection names the request's key: the job's cancelled_by_key, its event's actor.
    async with auth.connection(request) as conn:
        cancelled = await db.cancel(conn, job_id) if ids.is_valid(job_id) else None
        if cancelled is not None:
            return _cancelled(request, cancelled)
        # Not cancelled: say why, from the state the job is in now.
        job = await _existing(request, conn)
        if job.state in TERMINAL:
            raise ApiError(
                409, f"job {job.id} is already {job.state}; only unfinished jobs can be cancelled"
            )
        if job.state is JobState.RUNNING:
            return await _request_cancel(request, conn, job)
        # It moved between our update and our read (e.g. PENDING -> RUNNING): try once more.
        cancelled = await db.cancel(conn, job_id)
        if cancelled is not None:
            return _cancelled(request, cancelled)
    raise ApiError(409, f"job {job.id} changed state while cancelling; retry")


@routes.post(JOB_PATH + "/retry")
async def retry_job(request: web.Request) -> web.Response:
    """A FAILED or CANCELLED job runs again: PENDING, due now, a new budget of attempts."""
    job_id = request.match_info["id"]
    async with auth.connection(request) as conn:
        retried = await db.retry_by_hand(conn, job_id) if ids.is_valid(job_id) else None
        if retried is None:
            job = await _existing(request, conn)
            if job.workflow_id is not None:  # runs again when its parents have all SUCCEEDED
                retried = await workflows.retry(conn, job_id)
    if retried is None:
        raise ApiError(
            409,
            f"job {job.id} is {job.state}; only FAILED or CANCELLED jobs can be retried",
        )
    log.info("job retried by hand", extra={"job_id": retried.id, "type": retried.type})
    return json_response(retried.to_json())


@routes.post(JOB_PATH + "/run")
async def run_job_now(request: web.Request) -> web.Response:
    """A job waiting for a later run_at becomes due now; an already due one stays as it is."""
    job_id = request.match_info["id"]
    moved = await db.run_now(request.app[POOL], job_id) if ids.is_valid(job_id) else None
    if moved is not None:
        log.info("job made due now", extra={"job_id": moved.id, "type": moved.type})
        return json_response(moved.to_json())
    job = await _existing(request)
    if job.state not in CLAIMABLE:
        raise ApiError(
            409, f"job {job.id} is {job.state}; only PENDING or RETRYING jobs can be run now"
        )
    return json_response(job.to_json())


async def _request_cancel(request: web.Request, conn: Any, job: Job) -> web.Response:
    """A running job is stopped by its worker: record the request, tell the workers, 202."""
    marked = await db.request_cancel(conn, job.id)
    if marked is None:  # it finished meanwhile
        latest = await _existing(request, conn)
        raise ApiError(409, f"job {latest.id} is already {latest.state}; it cannot be cancelled")
    nc = request.app[LIFECYCLE].nats
    if nc is not None and nc.is_connected:
        # Fire and forget: a worker that misses it sees the request at its next lease renewal.
        with contextlib.suppress(Exception):
            await nc.publish(broker.cancel_subject(request.app[NATS_SETTINGS]), job.id.encode())
    log.info("cancellation requested", extra={"job_id": job.id, "type": job.type})
    return json_response(marked.to_json(), status=202)


def _cancelled(request: web.Request, job: Job) -> web.Response:
    metrics = request.app[METRICS]
    metrics.jobs_cancelled.labels(*metrics.known.job(job.type, job.queue)).inc()
    log.info("job cancelled", extra={"job_id": job.id, "type": job.type})
    return json_response(job.to_json())


@routes.get("/api/v1/stats")
async def stats(request: web.Request) -> web.Response:
    """Read from the job counts (orchestrix.db.counts), not the jobs: O(queues x
    types x states), whatever the number of jobs."""
    pool = request.app[POOL]
    counts = await job_counts.read(pool)
    served = await workers.served(pool)
    unserved: Counter[str] = Counter()
    for queue, job_type, waiting in counts.waiting:
        if not served.covers(queue, job_type):
            unserved[job_type] += waiting
    return json_response(
        {
            "jobs": {state.value: n for state, n in counts.by_state.items()},
            "total": sum(counts.by_state.values()),
            "workers": len(served.pairs),
            "waiting_for_executor": {
                "total": sum(unserved.values()),
                "types": dict(unserved.most_common(STATS_TYPES_MAX)),
            },
        }
    )


async def _existing(request: web.Request, conn: Any = None) -> Job:
    """The job of the route's id, read on ``conn`` if given (a handler that holds a
    connection must not wait for a second one: the pool could be empty)."""
    job_id = request.match_info["id"]
    conn = request.app[POOL] if conn is None else conn
    job = await db.get(conn, job_id) if ids.is_valid(job_id) else None
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    return job
