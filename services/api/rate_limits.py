"""Routes for ``/api/v1/rate-limits``: named limits on how fast jobs start.

A job names a limit in ``rate_limit``; its starts, across the whole fleet, take
tokens from the limit's bucket (db.rate_limits), which gains ``per_second``
tokens a second up to ``burst``. A job the bucket holds back waits, never fails.
A job naming an unknown limit is refused (422); a limit that unfinished jobs
name cannot be deleted (409).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from orchestrix.db import rate_limits as db
from orchestrix.models import NewJob
from orchestrix.services.api.errors import ApiError, json_response
from orchestrix.services.api.keys import POOL
from orchestrix.services.api.parsing import (
    RATE_LIMIT_PATTERN,
    checked_int,
    checked_name,
    read_json_object,
)

log = logging.getLogger("api")
routes = web.RouteTableDef()

RATE_LIMIT_PATH = "/api/v1/rate-limits/{name}"
# One start in 1,000 s at the least (PostgreSQL's float8 refuses a denormal such as 5e-324).
PER_SECOND_MIN = 0.001
PER_SECOND_MAX = 1_000_000.0
BURST_RANGE = (1, 1_000_000)
FIELDS = frozenset({"name", "per_second", "burst"})


@routes.post("/api/v1/rate-limits")
async def create_rate_limit(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    _no_unknown(data, FIELDS)
    for required in ("name", "per_second"):
        if required not in data:
            raise ApiError(400, f"{required} is required")
    name = checked_name("name", data["name"], RATE_LIMIT_PATTERN)
    per_second = _per_second(data["per_second"])
    burst = (
        checked_int("burst", data["burst"], BURST_RANGE)
        if data.get("burst") is not None
        else max(1, math.ceil(per_second))
    )
    created = await db.create(request.app[POOL], name, per_second, burst)
    if created is None:
        raise ApiError(409, f"a rate limit named {name} exists; change it with PATCH")
    log.info("rate limit created", extra={"rate_limit": name, "per_second": per_second})
    return json_response(created.to_json(), status=201)


@routes.get("/api/v1/rate-limits")
async def list_rate_limits(request: web.Request) -> web.Response:
    limits = await db.all_limits(request.app[POOL])
    return json_response({"rate_limits": [limit.to_json() for limit in limits]})


@routes.get(RATE_LIMIT_PATH)
async def get_rate_limit(request: web.Request) -> web.Response:
    return json_response((await _existing(request, _name(request))).to_json())


@routes.patch(RATE_LIMIT_PATH)
async def change_rate_limit(request: web.Request) -> web.Response:
    """``{"per_second": x, "burst": n}``, either or both."""
    name = _name(request)
    data = await read_json_object(request)
    _no_unknown(data, FIELDS - {"name"})
    if not data:
        raise ApiError(400, "the body must name per_second, burst or both")
    per_second = None if data.get("per_second") is None else _per_second(data["per_second"])
    burst = None if data.get("burst") is None else checked_int("burst", data["burst"], BURST_RANGE)
    changed = await db.change(request.app[POOL], name, per_second=per_second, burst=burst)
    if changed is None:
        raise ApiError(404, f"rate limit {name} not found")
    log.info("rate limit changed", extra={"rate_limit": name, "fields": ",".join(sorted(data))})
    return json_response(changed.to_json())


@routes.delete(RATE_LIMIT_PATH)
async def delete_rate_limit(request: web.Request) -> web.Response:
    name = _name(request)
    found = await _existing(request, name)
    in_use = await db.delete(request.app[POOL], name)
    if in_use is not None:
        raise ApiError(
            409, f"{in_use} unfinished job(s) name rate limit {name}: it cannot be deleted"
        )
    log.info("rate limit deleted", extra={"rate_limit": name})
    return json_response(found.to_json())


async def check_known(pool: Any, jobs: Iterable[NewJob]) -> None:
    """422 when a job names a rate limit that does not exist (one query, and none
    when no job names a limit)."""
    names = {job.rate_limit for job in jobs if job.rate_limit is not None}
    missing = await db.unknown(pool, names)
    if missing:
        raise ApiError(
            422,
            f"unknown rate limit(s): {', '.join(missing)}; create them with "
            "POST /api/v1/rate-limits first",
        )


def _per_second(value: Any) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not PER_SECOND_MIN <= value <= PER_SECOND_MAX
    ):
        raise ApiError(
            400, f"per_second must be a number from {PER_SECOND_MIN:g} to {PER_SECOND_MAX:g}"
        )
    return float(value)


def _no_unknown(data: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")


def _name(request: web.Request) -> str:
    return checked_name("name", request.match_info["name"], RATE_LIMIT_PATTERN)


async def _existing(request: web.Request, name: str) -> db.RateLimit:
    found = await db.get(request.app[POOL], name)
    if found is None:
        raise ApiError(404, f"rate limit {name} not found")
    return found
