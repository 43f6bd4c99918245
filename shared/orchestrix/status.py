"""The small HTTP server each scheduler and worker runs beside its work:
``/health`` (the process is alive), ``/ready`` (its dependencies answer and it
is not draining) and ``/metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, Gauge

from orchestrix.metrics import CONTENT_TYPE_LATEST, expose, record_dependencies
from orchestrix.settings import MetricsSettings

log = logging.getLogger("status")
READY_TIMEOUT_S = 2.0
# What a scheduler or worker cannot work without. Workers claim from PostgreSQL
# and poll when no wake-up comes; a scheduler's wake-ups and the lifeline's
# questions need NATS, but leases still get rescued without it. So NATS away
# makes them degraded, not unready (a failing /ready would stall a rollout).
REQUIRED = frozenset({"postgres", "shutdown"})

# Returns the name → "ok" or a reason for each dependency.
ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


def reasons(failing: dict[str, str]) -> str:
    return "; ".join(f"{name} {state}" for name, state in failing.items())


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class StatusServer:
    def __init__(
        self,
        settings: MetricsSettings,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        stop: asyncio.Event,
        dependency_up: Gauge | None = None,
    ) -> None:
        """``dependency_up``: set from a readiness check at each scrape of /metrics."""
        self._settings = settings
        self._registry = registry
        self._ready = ready
        self._dependency_up = dependency_up
        # /ready fails from the moment shutdown starts, while the process drains.
        self._stop = stop
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _readiness(self, request: web.Request) -> web.Response:
        checks = await self._ready()
        if self._stop.is_set():
            checks["shutdown"] = "draining"
        failing = {name: state for name, state in checks.items() if state != "ok"}
        blocking = {name: state for name, state in failing.items() if name in REQUIRED}
        if blocking:
            return _json(
                {"status": "unavailable", "error": reasons(blocking), "checks": checks}, 503
            )
        if failing:
            return _json({"status": "degraded", "warning": reasons(failing), "checks": checks})
        return _json({"status": "ready", "checks": checks})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._dependency_up is not None:
            record_dependencies(self._dependency_up, await self._ready())
        return web.Response(
            body=expose(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._readiness)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._settings.port
        log.info("status server listening", extra={"port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def check_dependencies(pool: Any, nc: Client | None) -> dict[str, str]:
    """PostgreSQL answers a query in time, and NATS is connected."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), READY_TIMEOUT_S)
        checks["postgres"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason is reported
        checks["postgres"] = f"unavailable: {exc!r}"
    if nc is not None:
        checks["nats"] = "ok" if nc.is_connected else "unavailable: not connected"
    return checks
