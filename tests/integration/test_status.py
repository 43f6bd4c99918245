"""The scheduler's and worker's status server over real HTTP: /ready follows PostgreSQL
and shutdown; NATS away only makes it degraded."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import nats
import pytest
from orchestrix.metrics import WorkerMetrics
from orchestrix.settings import MetricsSettings, Settings
from orchestrix.status import StatusServer, check_dependencies
from prometheus_client import CollectorRegistry

from tests.conftest import Api, free_port


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


async def test_each_scrape_says_which_dependency_answers(settings: Settings) -> None:
    # A pool to a port where nothing listens, and NATS connected: postgres 0, nats 1.
    dead = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    nc = await nats.connect(list(settings.nats.servers))
    metrics = WorkerMetrics(concurrency=1)
    server = StatusServer(
        MetricsSettings(host="127.0.0.1", port=0),
        metrics.registry,
        lambda: check_dependencies(dead, nc),
        asyncio.Event(),
        metrics.dependency_up,
    )
    await server.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.port}/metrics") as response,
        ):
            text = await response.text()
    finally:
        await server.stop()
        await nc.close()
        await dead.close()
    assert 'orchestrix_dependency_up{dependency="postgres"} 0.0' in text
    assert 'orchestrix_dependency_up{dependency="nats"} 1.0' in text


async def test_the_api_metrics_say_which_dependency_answers(api: Api) -> None:
    status, text, _ = await api.request("GET", "/metrics")
    assert status == 200
    assert 'orchestrix_dependency_up{dependency="postgres"} 1.0' in text
    assert 'orchestrix_dependency_up{dependency="nats"} 1.0' in text
