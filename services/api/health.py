"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

from aiohttp import web
from orchestrix.metrics import CONTENT_TYPE_LATEST, expose, record_dependencies
from orchestrix.services.api.errors import json_response
from orchestrix.services.api.keys import LIFECYCLE, METRICS, POOL
from orchestrix.status import REQUIRED, check_dependencies, reasons

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """The process is up and serving; says nothing about its dependencies."""
    return json_response({"status": "ok"})


# What the API cannot serve without is status.REQUIRED. Creating, reading and
# cancelling jobs need PostgreSQL alone; NATS only carries the fast path of a
# running job's cancel (its worker also finds the request at its next lease
# renewal). Failing /ready for NATS would take every API pod out of its Service
# during a NATS outage, so without it the API is degraded, and still ready.


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """200 while this process can serve jobs: PostgreSQL answers and it is not draining.

    The status is "degraded" (still 200) while NATS is away.
    """
    lifecycle = request.app[LIFECYCLE]
    checks = await check_dependencies(request.app[POOL], lifecycle.nats)
    if lifecycle.nats is None:
        checks["nats"] = "unavailable: connecting"
    if lifecycle.draining:
        checks["shutdown"] = "draining"
    failing = {name: state for name, state in checks.items() if state != "ok"}
    blocking = {name: state for name, state in failing.items() if name in REQUIRED}
    if blocking:
        return json_response(
            {"status": "unavailable", "error": reasons(blocking), "checks": checks}, status=503
        )
    if failing:
        return json_response({"status": "degraded", "warning": reasons(failing), "checks": checks})
    return json_response({"status": "ready", "checks": checks})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    measured = request.app[METRICS]
    record_dependencies(
        measured.dependency_up, await check_dependencies(request.app[POOL], lifecycle.nats)
    )
    body = expose(measured.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
