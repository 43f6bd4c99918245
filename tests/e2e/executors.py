"""Executors for end-to-end tests: each execution appends a line to a shared file.

The file (``ORX_TEST_EXECUTIONS``) is how tests count executions across worker
processes: ``job id, attempt, pid, start, end, how`` per line, written with one
O_APPEND write so lines from concurrent processes never interleave. ``how`` is
``done`` for an execution that ran to its end, ``stopped`` for one its worker
stopped (cancelled, handed back, fenced): its end is when it really stopped,
so tests can tell whether two attempts of a job ever ran at the same time.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from orchestrix import JobContext, executor


def _append(job: JobContext, started: float, how: str = "done") -> None:
    line = f"{job.id},{job.attempt},{os.getpid()},{started:.6f},{time.time():.6f},{how}\n"
    fd = os.open(os.environ["ORX_TEST_EXECUTIONS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@executor("record")
async def record(job: JobContext) -> Any:
    started = time.time()
    try:
        await asyncio.sleep(float(job.payload.get("sleep_ms", 0)) / 1000)
    except asyncio.CancelledError:
        _append(job, started, "stopped")
        raise
    _append(job, started)
    return {"pid": os.getpid()}


@executor("record_sync")
def record_sync(job: JobContext) -> Any:
    """The same, as a plain function: it checks ``job.cancelled`` while it sleeps."""
    started = time.time()
    deadline = started + float(job.payload.get("sleep_ms", 0)) / 1000
    while time.time() < deadline:
        if job.cancelled:
            _append(job, started, "stopped")
            return None
        time.sleep(0.01)
    _append(job, started)
    return {"pid": os.getpid()}


@executor("stuck_sync")
def stuck_sync(job: JobContext) -> Any:
    """A plain function that ignores ``job.cancelled`` until the file ``release`` exists.

    It gives up after ``max_s`` (30 s), so that no test leaves it running for ever.
    """
    release = str(job.payload["release"])
    deadline = time.monotonic() + float(job.payload.get("max_s", 30))
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"released": os.path.exists(release)}


@executor("add_parents")
async def add_parents(job: JobContext) -> Any:
    """A workflow's step: its payload's ``n`` plus every parent's result ``total``."""
    return {"total": int(job.payload.get("n", 0)) + sum(p["total"] for p in job.parents.values())}
