"""The demo executors (demo_job, noop) run only where WORKER_DEMO_EXECUTORS switches them on.

The container image leaves it off, `orchestrix dev` and the test harness switch
it on. A worker without it does not register them: a demo_job waits for an
executor (``waiting_for_executor`` in /api/v1/stats) instead of running.
"""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import SystemFactory
from tests.e2e.harness import until

pytestmark = pytest.mark.timeout(90)


async def test_a_worker_without_the_switch_does_not_run_demo_jobs(
    make_system: SystemFactory, pool: asyncpg.Pool
) -> None:
    system = make_system(WORKER_DEMO_EXECUTORS="false", WORKER_POLL_INTERVAL="100ms")
    api, worker = system.start("api"), system.start("worker")
    await system.ready(api)
    await system.ready(worker)
    url = f"http://127.0.0.1:{api.port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/jobs", json={"type": "demo_job"}) as response:
            job = await response.json()
        # The worker registered its executors (the tests' own), not the demo ones.
        types = await pool.fetchval("SELECT types FROM workers")
        assert "record" in types
        assert "demo_job" not in types
        assert "noop" not in types
        await asyncio.sleep(1)  # ten polls of the worker
        async with http.get(f"{url}/api/v1/jobs/{job['id']}") as response:
            assert (await response.json())["state"] == "PENDING"
        async with http.get(f"{url}/api/v1/stats") as response:
            stats = await response.json()
        assert stats["waiting_for_executor"]["types"] == {"demo_job": 1}
        # Switched on, a worker runs it.
        demo = system.start("worker", WORKER_DEMO_EXECUTORS="true")
        await system.ready(demo)

        async def succeeded() -> bool:
            async with http.get(f"{url}/api/v1/jobs/{job['id']}") as response:
                return bool((await response.json())["state"] == "SUCCEEDED")

        await until(succeeded, 20, "the demo_job to run on the switched-on worker", demo.log)
