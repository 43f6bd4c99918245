"""The contract the probes of deploy/k8s rely on, on a real status server.

Liveness asks /health, which answers while the process runs, whatever its
dependencies do; readiness asks /ready, which fails while a dependency is away
and from the moment shutdown starts. (The API's own handlers are in
services/api/health.py; tests/integration covers them against real servers.)
"""

from __future__ import annotations

import asyncio

import aiohttp
from orchestrix.settings import MetricsSettings
from orchestrix.status import StatusServer
from prometheus_client import CollectorRegistry


async def test_status_server_probes() -> None:
    dependencies = {"postgres": "ok", "nats": "ok"}

    async def ready() -> dict[str, str]:
        return dict(dependencies)

    stop = asyncio.Event()
    settings = MetricsSettings(host="127.0.0.1", port=0)
    server = StatusServer(settings, CollectorRegistry(), ready, stop)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def status(path: str) -> int:
                async with http.get(base + path) as response:
                    return response.status

            assert (await status("/health"), await status("/ready")) == (200, 200)
            assert await status("/metrics") == 200
            dependencies["postgres"] = "unavailable: gone"
            assert (await status("/health"), await status("/ready")) == (200, 503)
            dependencies["postgres"] = "ok"
            stop.set()  # shutdown started: drain, take no new work
            assert (await status("/health"), await status("/ready")) == (200, 503)
    finally:
        await server.stop()
