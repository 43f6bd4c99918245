"""Routes for ``/api/v1/workflows``: a group of jobs with dependencies, created at once.

``POST`` takes ``{"name": ..., "jobs": [...]}``: each job as for ``POST
/api/v1/jobs`` plus a ``key`` (unique in the request) and ``depends_on`` (the
keys of its parents). The graph is checked before anything is written: keys
known and unique, no job its own parent, no cycle, at most WORKFLOW_JOBS_MAX
jobs; then everything is created in one transaction (orchestrix.db.workflows).
A job with parents waits (WAITING) until all of them have SUCCEEDED.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from orchestrix import ids
from orchestrix.db import bulk
from orchestrix.db import workflows as db
from orchestrix.services.api import auth
from orchestrix.services.api.bulk import cancel_selected
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.keys import METRICS, POOL
from orchestrix.services.api.parsing import checked_name, parse_new_job, read_json_object
from orchestrix.services.api.rate_limits import check_known

log = logging.getLogger("api")
routes = web.RouteTableDef()

WORKFLOW_JOBS_MAX = 1000
WORKFLOW_FIELDS = frozenset({"name", "jobs"})
NAME_MAX = 255
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# The fields of a workflow's job beside those of a job; an idempotency key is
# not one (a workflow is created whole or not at all, not joined to jobs made
# before).
JOB_EXTRA_FIELDS = frozenset({"key", "depends_on"})


@routes.post("/api/v1/workflows")
async def create_workflow(request: web.Request) -> web.Response:
    name, jobs = parse_workflow(await read_json_object(request))
    auth.charge_jobs(request, len(jobs))
    await check_known(request.app[POOL], [item.job for item in jobs])
    # The connection names the request's key: the jobs' created_by_key, their events.
    async with auth.connection(request) as conn:
        workflow, _ = await db.create(conn, name, jobs)
    request.app[METRICS].count_created(workflow.jobs)
    log.info("workflow created", extra={"workflow_id": workflow.id, "jobs": len(jobs)})
    return json_response(workflow.to_json(), status=201)


@routes.get("/api/v1/workflows/{id}")
async def get_workflow(request: web.Request) -> web.Response:
    return json_response((await _existing(request)).to_json())


@routes.delete("/api/v1/workflows/{id}")
async def cancel_workflow(request: web.Request) -> web.Response:
    """Cancel every job of the workflow that has not finished."""
    workflow = await _existing(request)
    selection = bulk.Selection(ids=[job.id for job in workflow.jobs])
    return json_response(await cancel_selected(request, selection))


async def _existing(request: web.Request) -> db.Workflow:
    workflow_id = request.match_info["id"]
    workflow = await db.get(request.app[POOL], workflow_id) if ids.is_valid(workflow_id) else None
    if workflow is None:
        raise ApiError(404, f"workflow {workflow_id} not found")
    return workflow


def parse_workflow(data: Mapping[str, Any]) -> tuple[str | None, list[db.NewWorkflowJob]]:
    unknown = sorted(set(data) - WORKFLOW_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX):
        raise ApiError(400, f"name must be a string of 1 to {NAME_MAX} characters")
    items = data.get("jobs")
    if not isinstance(items, list) or not 1 <= len(items) <= WORKFLOW_JOBS_MAX:
        raise ApiError(400, f"jobs must be an array of 1 to {WORKFLOW_JOBS_MAX} jobs")
    jobs: list[db.NewWorkflowJob] = []
    for index, item in enumerate(items):
        try:
            jobs.append(_parse_job(item))
        except ApiError as exc:
            raise ApiError(exc.status, f"jobs[{index}]: {exc.message}") from None
    _check_graph(jobs)
    return name, jobs


def _parse_job(item: Any) -> db.NewWorkflowJob:
    if not isinstance(item, dict):
        raise ApiError(400, "must be a JSON object")
    if "idempotency_key" in item:
        raise ApiError(400, "idempotency_key is not supported in a workflow's jobs")
    if "key" not in item:
        raise ApiError(400, "key is required: the job's name in the workflow")
    key = checked_name("key", item["key"], KEY_PATTERN)
    depends_on = item.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(isinstance(p, str) for p in depends_on):
        raise ApiError(400, "depends_on must be an array of the keys of other jobs")
    if len(depends_on) > WORKFLOW_JOBS_MAX:
        raise ApiError(400, f"depends_on may name at most {WORKFLOW_JOBS_MAX} jobs")
    job = parse_new_job({k: v for k, v in item.items() if k not in JOB_EXTRA_FIELDS})
    return db.NewWorkflowJob(key, job, tuple(depends_on))


def _check_graph(jobs: list[db.NewWorkflowJob]) -> None:
    keys: set[str] = set()
    for item in jobs:
        if item.key in keys:
            raise ApiError(400, f"key {item.key!r} is used by more than one job")
        keys.add(item.key)
    for item in jobs:
        for parent in item.depends_on:
            if parent == item.key:
                raise ApiError(400, f"job {item.key!r} depends on itself")
            if parent not in keys:
                raise ApiError(
                    400, f"job {item.key!r} depends on {parent!r}, which is no job's key"
                )
    ordered = set(db.topological_order({item.key: item.depends_on for item in jobs}))
    if len(ordered) < len(jobs):
        stuck = [item.key for item in jobs if item.key not in ordered]
        shown = ", ".join(repr(key) for key in stuck[:10])
        raise ApiError(
            400, f"depends_on has a cycle: the jobs must form a DAG (on or after it: {shown})"
        )
