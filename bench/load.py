"""HTTP load: an open-loop generator (a fixed offered rate) and closed-loop clients.

Open loop: request *i* is issued at ``start + i / rate`` whether or not earlier
ones have been answered, so a slow server shows up as a growing backlog and late
answers, never as a lower offered rate. The generator reports the rate it
actually issued, so a generator that cannot keep up is visible too.

Closed loop: ``clients`` tasks, each sending its next request when the previous
one is answered: the most the server sustains at that concurrency.

Bodies are encoded once; responses are parsed only when the caller asks for the
job ids. The benchmark process's own CPU time is reported beside each result,
so a saturated client is visible.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson
import psutil

JSON = {"Content-Type": "application/json"}
NOOP_BODY = orjson.dumps({"type": "noop"})


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (need not be sorted); ``p`` in 0..100."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 / max of durations given in seconds, in milliseconds."""
    return {
        "p50": round(percentile(seconds, 50) * 1000, 3),
        "p95": round(percentile(seconds, 95) * 1000, 3),
        "p99": round(percentile(seconds, 99) * 1000, 3),
        "max": round(max(seconds) * 1000, 3),
    }


def session(connections: int, headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A client session; ``headers`` go with every request (an API key's Authorization)."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=False, ttl_dns_cache=None)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60), headers=headers
    )


class _ProcessCpu:
    def __init__(self) -> None:
        self._process = psutil.Process()
        self._start = self._now()
        self._wall = time.monotonic()

    def _now(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def cores(self) -> float:
        """Cores this process kept busy since it was created."""
        wall = time.monotonic() - self._wall
        return round((self._now() - self._start) / wall, 3) if wall > 0 else 0.0


@dataclass
class OpenLoopResult:
    target_rate: float
    duration_s: float
    issued: int = 0
    created: int = 0  # 201 answers
    created_in_window: int = 0  # 201 answers received before the issuing window closed
    errors: int = 0
    issue_span_s: float = 0.0
    client_cores: float = 0.0
    ids: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def offered_rate(self) -> float:
        """The rate the generator actually issued requests at."""
        return self.issued / self.issue_span_s if self.issue_span_s > 0 else 0.0

    @property
    def accepted_rate(self) -> float:
        """Jobs created per second while the window was open."""
        return self.created_in_window / self.duration_s if self.duration_s > 0 else 0.0


async def open_loop(
    http: aiohttp.ClientSession,
    url: str,
    rate: float,
    duration_s: float,
    *,
    keep_ids: bool = False,
    body: bytes = NOOP_BODY,
    settle_s: float = 30.0,
    at_window_end: Callable[[], Awaitable[None]] | None = None,
) -> OpenLoopResult:
    """POST ``body`` to ``url`` at ``rate`` per second for ``duration_s``.

    ``at_window_end`` is awaited as soon as the last request is issued. Returns
    once every request is answered, or ``settle_s`` after the window closed
    (unanswered ones count as errors).
    """
    result = OpenLoopResult(target_rate=rate, duration_s=duration_s)
    total = max(1, round(rate * duration_s))
    cpu = _ProcessCpu()
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_end = start + duration_s
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        sent = loop.time()
        try:
            async with http.post(url, data=body, headers=JSON) as response:
                data = await response.read()
                if response.status == 201:
                    result.created += 1
                    done = loop.time()
                    if done <= window_end:
                        result.created_in_window += 1
                    result.latencies_s.append(done - sent)
                    if keep_ids:
                        result.ids.append(orjson.loads(data)["id"])
                    return
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{response.status}: {data[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(repr(exc))

    while result.issued < total:
        due = min(total, math.floor((loop.time() - start) * rate) + 1)
        while result.issued < due:
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            result.issued += 1
        if result.issued < total:
            await asyncio.sleep(max(0.0, start + result.issued / rate - loop.time()))
    # `total` intervals of 1/rate: exactly duration_s when every request left on time.
    result.issue_span_s = loop.time() - start + 1 / rate
    if at_window_end is not None:
        await at_window_end()
    if pending:
        _, late = await asyncio.wait(pending, timeout=settle_s)
        for task in late:
            task.cancel()
        result.errors += len(late)
    result.client_cores = cpu.cores()
    return result


@dataclass
class ClosedLoopResult:
    clients: int
    duration_s: float
    requests: int = 0
    jobs: int = 0
    errors: int = 0
    client_cores: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.duration_s if self.duration_s > 0 else 0.0


async def closed_loop(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    clients: int,
    duration_s: float,
    warmup_s: float,
    jobs_per_request: int = 1,
) -> ClosedLoopResult:
    """``clients`` tasks POSTing ``body`` back to back; counted after ``warmup_s``.

    A request counts when it is answered 201 inside the measured window, for
    ``jobs_per_request`` jobs.
    """
    result = ClosedLoopResult(clients=clients, duration_s=duration_s)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    measure_from = begin + warmup_s
    measure_to = measure_from + duration_s
    cpu: _ProcessCpu | None = None

    async def client() -> None:
        nonlocal cpu
        while True:
            sent = loop.time()
            if sent >= measure_to:
                return
            if cpu is None and sent >= measure_from:
                cpu = _ProcessCpu()
            try:
                async with http.post(url, data=body, headers=JSON) as response:
                    data = await response.read()
                    ok = response.status == 201
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok, data = False, repr(exc).encode()
            done = loop.time()
            if not measure_from <= sent or done > measure_to:
                continue
            result.requests += 1
            if ok:
                result.jobs += jobs_per_request
                result.latencies_s.append(done - sent)
            else:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(data[:200].decode(errors="replace"))

    await asyncio.gather(*(client() for _ in range(clients)))
    result.client_cores = cpu.cores() if cpu is not None else 0.0
    return result
