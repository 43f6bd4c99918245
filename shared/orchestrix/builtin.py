"""Demo executors, so a new user can watch jobs run, retry and fail.

A worker loads them only with WORKER_DEMO_EXECUTORS=true, which `orchestrix dev`
sets and the container image does not: in production, a batch of hour-long
``demo_job`` sleeps would hold every slot.

``demo_job`` returns its payload as the result. Its payload may ask it to
sleep (``"sleep_ms": 250``) or to fail (``"fail": "retryable"`` or
``"permanent"``). ``noop`` does nothing and returns nothing: for benchmarks.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrix.errors import InvalidPayload, PermanentError
from orchestrix.executors import JobContext, executor

MAX_SLEEP_MS = 3_600_000


class DemoFailure(Exception):
    """The retryable failure ``demo_job`` raises when asked to."""


@executor("demo_job")
async def demo_job(job: JobContext) -> Any:
    sleep_ms = job.payload.get("sleep_ms", 0)
    if isinstance(sleep_ms, bool) or not isinstance(sleep_ms, int | float):
        raise InvalidPayload("sleep_ms must be a number of milliseconds")
    if not 0 <= sleep_ms <= MAX_SLEEP_MS:
        raise InvalidPayload(f"sleep_ms must be between 0 and {MAX_SLEEP_MS}")
    fail = job.payload.get("fail")
    if fail not in (None, "retryable", "permanent"):
        raise InvalidPayload('fail must be "retryable" or "permanent"')
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    if fail == "permanent":
        raise PermanentError("demo_job was asked to fail permanently")
    if fail == "retryable":
        raise DemoFailure(f"demo_job was asked to fail (attempt {job.attempt})")
    return dict(job.payload)


@executor("noop")
async def noop(job: JobContext) -> None:
    return None
