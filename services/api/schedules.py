"""Routes for ``/api/v1/schedules``: cron schedules that create jobs.

A schedule names a cron expression in an IANA time zone and the job each tick
creates; the schedulers fire it (services/scheduler/cron.py). Creating,
changing or resuming a schedule computes its next tick from now; the ticks a
paused schedule passes are not missed, they do not exist for it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from orchestrix.cron import Cron, InvalidCron
from orchestrix.db import schedules as db
from orchestrix.models import rfc3339
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.keys import POOL
from orchestrix.services.api.parsing import (
    checked_int,
    checked_name,
    parse_new_job,
    read_json_object,
)
from orchestrix.services.api.rate_limits import check_known

log = logging.getLogger("api")
routes = web.RouteTableDef()

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
MISSED = ("skip", "run_once")
OVERLAP = ("allow", "skip")
CATCH_UP_RANGE = (1, 7 * 24 * 3600)
DEFAULTS: dict[str, Any] = {
    "timezone": "UTC",
    "missed": "skip",
    "catch_up_seconds": 60,
    "overlap": "allow",
    "paused": False,
}
FIELDS = frozenset({"name", "cron", "job", *DEFAULTS})
# How many upcoming ticks a schedule shows.
NEXT_RUNS = 5
SCHEDULE_PATH = "/api/v1/schedules/{name}"


@routes.post("/api/v1/schedules")
async def create_schedule(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    for required in ("name", "cron", "job"):
        if required not in data:
            raise ApiError(400, f"{required} is required")
    name = checked_name("name", data["name"], NAME_PATTERN)
    fields, cron = _checked({**DEFAULTS, **data})
    await _check_rate_limit(request, fields)
    created = await db.create(request.app[POOL], name, fields, _first_tick(cron, fields))
    if created is None:
        raise ApiError(409, f"a schedule named {name} exists; change it with PATCH")
    log.info("schedule created", extra={"schedule": name, "cron": created.cron})
    return json_response(_shown(created, cron), status=201)


@routes.get("/api/v1/schedules")
async def list_schedules(request: web.Request) -> web.Response:
    schedules = await db.list_all(request.app[POOL])
    return json_response({"schedules": [_shown(s) for s in schedules]})


@routes.get(SCHEDULE_PATH)
async def get_schedule(request: web.Request) -> web.Response:
    found = await db.get(request.app[POOL], _name(request))
    if found is None:
        raise ApiError(404, f"schedule {_name(request)} not found")
    return json_response(_shown(found))


@routes.patch(SCHEDULE_PATH)
async def change_schedule(request: web.Request) -> web.Response:
    name = _name(request)
    data = await read_json_object(request)
    if "name" in data:
        raise ApiError(400, "name cannot be changed; create a new schedule instead")
    async with request.app[POOL].acquire() as conn, conn.transaction():
        found = await db.get(conn, name, lock=True)
        if found is None:
            raise ApiError(404, f"schedule {name} not found")
        current = {field: getattr(found, field) for field in FIELDS - {"name"}}
        fields, cron = _checked({**current, **data})
        await _check_rate_limit(request, fields)
        timing = ("cron", "timezone", "paused")
        if any(fields[f] != current[f] for f in timing):
            next_tick = _first_tick(cron, fields)
        else:
            next_tick = found.next_tick_at
        changed = await db.replace(conn, name, fields, next_tick)
    log.info("schedule changed", extra={"schedule": name, "fields": ",".join(sorted(data))})
    return json_response(_shown(changed, cron))


@routes.delete(SCHEDULE_PATH)
async def delete_schedule(request: web.Request) -> web.Response:
    name = _name(request)
    deleted = await db.delete(request.app[POOL], name)
    if deleted is None:
        raise ApiError(404, f"schedule {name} not found")
    log.info("schedule deleted", extra={"schedule": name})
    return json_response(_shown(deleted))


async def _check_rate_limit(request: web.Request, fields: Mapping[str, Any]) -> None:
    """422 when the template names a rate limit that does not exist (now: one
    deleted later holds the ticks' jobs back until it is created again)."""
    if fields["job"]["rate_limit"] is not None:
        try:
            await check_known(request.app[POOL], [parse_new_job(dict(fields["job"]))])
        except ApiError as exc:
            raise ApiError(exc.status, f"job: {exc.message}") from None


def _name(request: web.Request) -> str:
    return checked_name("name", request.match_info["name"], NAME_PATTERN)


def _checked(data: Mapping[str, Any]) -> tuple[dict[str, Any], Cron]:
    """Every field but the name, validated and completed, and the parsed cron."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    try:
        cron = Cron.parse(data["cron"], data["timezone"])
    except InvalidCron as exc:
        raise ApiError(400, str(exc)) from None
    if data["missed"] not in MISSED:
        raise ApiError(400, f"missed must be one of {', '.join(MISSED)}")
    if data["overlap"] not in OVERLAP:
        raise ApiError(400, f"overlap must be one of {', '.join(OVERLAP)}")
    if not isinstance(data["paused"], bool):
        raise ApiError(400, "paused must be true or false")
    return {
        "cron": cron.expression,
        "timezone": data["timezone"],
        "job": _template(data["job"]),
        "missed": data["missed"],
        "catch_up_seconds": checked_int(
            "catch_up_seconds", data["catch_up_seconds"], CATCH_UP_RANGE
        ),
        "overlap": data["overlap"],
        "paused": data["paused"],
    }, cron


def _template(job: Any) -> dict[str, Any]:
    """The job each tick creates, with every field filled in."""
    if not isinstance(job, dict):
        raise ApiError(400, "job must be a JSON object")
    extra = sorted(set(job) - db.TEMPLATE_FIELDS)
    if extra:
        raise ApiError(
            400,
            f"job: field(s) {', '.join(extra)} cannot be set on a schedule's job "
            f"(allowed: {', '.join(sorted(db.TEMPLATE_FIELDS))}); a tick's job is due "
            "when it fires, and the tick is its idempotency key",
        )
    try:
        new = parse_new_job(job)
    except ApiError as exc:
        raise ApiError(exc.status, f"job: {exc.message}") from None
    return {
        "type": new.type,
        "payload": dict(new.payload),
        "queue": new.queue,
        "priority": new.priority,
        "max_attempts": new.max_attempts,
        "timeout_seconds": new.timeout_seconds,
        "concurrency_key": new.concurrency_key,
        "rate_limit": new.rate_limit,
    }


def _first_tick(cron: Cron, fields: Mapping[str, Any]) -> datetime | None:
    return None if fields["paused"] else cron.next_after(datetime.now(UTC))


def _shown(schedule: db.Schedule, cron: Cron | None = None) -> dict[str, Any]:
    shown = schedule.to_json()
    runs: list[datetime] = []
    if not schedule.paused and schedule.next_tick_at is not None:
        try:
            cron = cron or Cron.parse(schedule.cron, schedule.timezone)
        except InvalidCron:
            cron = None
        if cron is not None:
            first = schedule.next_tick_at
            runs = [first, *cron.next_ticks(first, NEXT_RUNS - 1)]
    shown["next_runs"] = [rfc3339(run) for run in runs]
    return shown
