"""The scheduler's and worker's status server over real HTTP: /ready follows PostgreSQL
and shutdown; NATS away only makes it degraded."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from orchestrix.settings import MetricsSettings
from orchestrix.status import StatusServer
from prometheus_client import CollectorRegistry


@pytest.mark.parametrize(
    ("checks", "stopping", "status", "body_status"),
    [
        ({"postgres": "ok", "nats": "ok"}, False, 200, "ready"),
        ({"postgres": "ok", "nats": "unavailable: not connected"}, False, 200, "degraded"),
        ({"postgres": "unavailable: timeout", "nats": "ok"}, False, 503, "unavailable"),
        ({"postgres": "ok", "nats": "ok"}, True, 503, "unavailable"),
    ],
)
async def test_ready_needs_postgres_and_not_draining_only(
    checks: dict[str, str], stopping: bool, status: int, body_status: str
) -> None:
    stop = asyncio.Event()
    if stopping:
        stop.set()

    async def ready() -> dict[str, str]:
        return dict(checks)

    server = StatusServer(
        MetricsSettings(host="127.0.0.1", port=0), CollectorRegistry(), ready, stop
    )
    await server.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.port}/ready") as response,
        ):
            body = await response.json()
    finally:
        await server.stop()
    assert response.status == status
    assert body["status"] == body_status
    assert body["checks"]["nats"] == checks["nats"]
