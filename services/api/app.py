"""Builds the API application from settings and runs it until a signal stops it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from orchestrix import broker
from orchestrix.db.pool import connect_with_backoff
from orchestrix.labels import LabelFollower
from orchestrix.lifecycle import session_settings, stop_on_signals
from orchestrix.metrics import ApiMetrics, KnownLabels, http_method
from orchestrix.services.api import (
    auth,
    bulk,
    events,
    health,
    jobs,
    openapi,
    queues,
    rate_limits,
    schedules,
    workflows,
)
from orchestrix.services.api.creator import Creator
from orchestrix.services.api.errors import MAX_BODY, error_middleware
from orchestrix.services.api.feed import Feed
from orchestrix.services.api.keys import (
    AUTH,
    CREATOR,
    FEED,
    LIFECYCLE,
    LIST_MAX_BYTES,
    METRICS,
    NATS_SETTINGS,
    POOL,
    Lifecycle,
)
from orchestrix.settings import Settings

log = logging.getLogger("api")


def _metrics_middleware(metrics: ApiMetrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        # The route template, never the raw path: job ids must not become labels.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = http_method(request.method)
        metrics.http_requests.labels(method, route, str(response.status)).inc()
        metrics.http_duration.labels(method, route).observe(time.perf_counter() - started)
        return response

    return middleware


def build_app(settings: Settings, pool: Any, metrics: ApiMetrics | None = None) -> web.Application:
    metrics = metrics or ApiMetrics(known=KnownLabels(settings.metrics.queues))
    # The error middleware sits inside the metrics one, so errors are counted
    # with the status the client received; the key check inside both, so that its
    # refusals are JSON errors, and counted. With API_AUTH=off there is no check.
    middlewares = [_metrics_middleware(metrics), error_middleware]
    authenticator = None
    if settings.auth.enabled:
        authenticator = auth.Authenticator(pool, settings.auth)
        middlewares.append(auth.middleware(authenticator))
    app = web.Application(client_max_size=settings.api.max_body_bytes, middlewares=middlewares)
    if authenticator is not None:
        app[auth.AUTHENTICATOR] = authenticator
    app[POOL] = pool
    app[CREATOR] = Creator(pool)
    app[METRICS] = metrics
    app[NATS_SETTINGS] = settings.nats
    app[MAX_BODY] = settings.api.max_body_bytes
    app[LIST_MAX_BYTES] = settings.api.list_max_bytes
    app[AUTH] = settings.auth
    app[LIFECYCLE] = Lifecycle()
    app[FEED] = Feed(
        pool,
        poll_interval_s=settings.api.events_poll_interval_s,
        heartbeat_s=settings.api.events_heartbeat_s,
    )
    app.cleanup_ctx.append(_read_events)
    app.cleanup_ctx.append(_follow_label_values)
    # First of all at shutdown: the event streams end, and do not hold the drain up.
    app.on_shutdown.append(_end_event_streams)
    app.add_routes(bulk.routes)
    app.add_routes(events.routes)
    app.add_routes(jobs.routes)
    app.add_routes(queues.routes)
    app.add_routes(rate_limits.routes)
    app.add_routes(schedules.routes)
    app.add_routes(workflows.routes)
    app.add_routes(health.routes)
    app.add_routes(openapi.routes)
    return app


async def _read_events(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[FEED].run())
    yield
    app[FEED].close()
    await task


async def _follow_label_values(app: web.Application) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(LabelFollower(app[POOL], app[METRICS].known).run_forever(stop))
    yield
    stop.set()
    await task


async def _end_event_streams(app: web.Application) -> None:
    app[FEED].close()


async def serve(settings: Settings) -> None:
    """Run the API until SIGTERM or SIGINT, then stop accepting and finish in-flight requests."""
    settings.auth.check_listener(settings.api.host)
    stop = stop_on_signals()

    pool = await connect_with_backoff(
        settings.database, stop, server_settings=session_settings("api")
    )
    if pool is None:
        return
    app = build_app(settings, pool)
    lifecycle = app[LIFECYCLE]

    async def connect_nats() -> None:
        lifecycle.nats = await broker.connect_with_backoff(settings.nats, "orchestrix-api", stop)

    # The API serves without NATS; /ready says whether it is there.
    nats_task = asyncio.create_task(connect_nats())
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.api.shutdown_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.api.host, settings.api.port, backlog=1024)
    await site.start()
    log.info(
        "api listening",
        extra={
            "host": settings.api.host,
            "port": settings.api.port,
            "auth": "on" if settings.auth.enabled else "off",
        },
    )
    try:
        await stop.wait()
    finally:
        log.info("api stopping: no new connections, finishing requests in flight")
        lifecycle.draining = True
        await runner.cleanup()
        nats_task.cancel()
        if lifecycle.nats is not None:
            await lifecycle.nats.close()
        await pool.close()
        log.info("api stopped")
