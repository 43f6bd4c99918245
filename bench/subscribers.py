"""Idle listeners of the event stream: what ``subscribers`` (1,000) open streams cost one API.

Only the API runs. The phase opens ``subscribers`` streams of
``GET /api/v1/events`` (unfiltered: each would get every event), then:

- idle: for ``subscribers_idle_s`` (10 s) nothing happens; the API's CPU over
  that time and its resident memory (now, against before the streams opened)
  are the cost of holding them;
- a burst: ``subscribers_events`` jobs (100) are created in one batch; the
  time until every stream has received every creation event, and the API's CPU
  for the fan-out, are reported beside it.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import aiohttp
import psutil

from bench.context import Context
from bench.infra import CpuMeter


def _rss_mib(pid: int) -> float:
    rss: int = psutil.Process(pid).memory_info().rss
    return round(rss / 2**20, 1)


class _Listeners:
    """How many streams have received every event of the burst."""

    def __init__(self, streams: int, want: int) -> None:
        self.want = want
        self.left = streams
        self.all_got = asyncio.Event()

    async def listen(self, http: aiohttp.ClientSession, url: str, opened: asyncio.Event) -> None:
        got = 0
        async with http.get(url) as response:
            response.raise_for_status()
            await response.content.readline()  # ": subscribed"
            opened.set()
            async for line in response.content:
                if line.startswith(b"data: "):
                    got += 1
                    if got == self.want:
                        self.left -= 1
                        if self.left == 0:
                            self.all_got.set()


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    n = o.subscribers
    # Each stream is a socket on both sides.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n + 256), hard))
    async with ctx.database("subscribers") as url, ctx.stack("subscribers", "events", url) as stack:
        api = stack.start("api")
        await stack.ready(api)
        before_mib = _rss_mib(api.pid)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            want = o.subscribers_events
            listeners = _Listeners(n, want)
            openings = [asyncio.Event() for _ in range(n)]
            stream = stack.api_url + "/api/v1/events"
            tasks = [
                asyncio.create_task(listeners.listen(http, stream, opened)) for opened in openings
            ]
            try:
                started = time.monotonic()
                async with asyncio.timeout(60):
                    for opened in openings:
                        await opened.wait()
                open_s = time.monotonic() - started
                meter = CpuMeter(stack.roles(), ctx.servers.pids)
                await asyncio.sleep(o.subscribers_idle_s)
                idle = meter.stop()
                held_mib = _rss_mib(api.pid)

                meter = CpuMeter(stack.roles(), ctx.servers.pids)
                body = {"jobs": [{"type": "noop"} for _ in range(want)]}
                sent = time.monotonic()
                async with http.post(stack.api_url + "/api/v1/jobs/batch", json=body) as made:
                    made.raise_for_status()
                async with asyncio.timeout(60):
                    await listeners.all_got.wait()
                delivered_s = time.monotonic() - sent
                burst = meter.stop()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    result = {
        "subscribers": n,
        "open_s": round(open_s, 2),
        "api_rss_mib_before": before_mib,
        "api_rss_mib_held": held_mib,
        "api_rss_kib_per_subscriber": round((held_mib - before_mib) * 1024 / n, 1),
        "idle_s": o.subscribers_idle_s,
        "idle_api_cpu_s": idle.get("api", 0.0),
        "idle_api_cpu_share": round(idle.get("api", 0.0) / o.subscribers_idle_s, 4),
        "burst_events": want,
        "burst_delivered_s": round(delivered_s, 3),
        "burst_api_cpu_s": burst.get("api", 0.0),
    }
    print(
        f"  {n} idle event streams: API {before_mib} -> {held_mib} MiB, "
        f"{result['idle_api_cpu_share'] * 100:.2f} % of a core idle; "
        f"{want} events to every stream in {delivered_s:.2f} s",
        flush=True,
    )
    return result
