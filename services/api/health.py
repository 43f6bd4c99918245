"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

from aiohttp import web
from orchestrix.metrics import CONTENT_TYPE_LATEST, expose
from orchestrix.status import check_dependencies

from services.api.errors import json_response
from services.api.keys import LIFECYCLE, METRICS, POOL

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """The process is up and serving; says nothing about its dependencies."""
    return json_response({"status": "ok"})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """200 only while this process can do its work: dependencies answer, not draining."""
    lifecycle = request.app[LIFECYCLE]
    checks = await check_dependencies(request.app[POOL], lifecycle.nats)
    if lifecycle.nats is None:
        checks["nats"] = "unavailable: connecting"
    if lifecycle.draining:
        checks["shutdown"] = "draining"
    failing = {name: state for name, state in checks.items() if state != "ok"}
    if failing:
        reason = "; ".join(f"{name} {state}" for name, state in failing.items())
        return json_response(
            {"status": "unavailable", "error": reason, "checks": checks}, status=503
        )
    return json_response({"status": "ready", "checks": checks})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = expose(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
