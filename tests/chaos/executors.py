"""The chaos suite's executors: every execution leaves a START line and an end line in a file.

A worker killed with SIGKILL loses everything in memory and may lose its
database writes, but lines already written to a file stay. The file named by
``ORX_CHAOS_RECORDS`` therefore holds the true history of executions:

    START,<job id>,<attempt>,<pid>,<time.time()>   before the work begins
    END,<job id>,<attempt>,<pid>,<time.time()>     it returned its result
    FAIL,<job id>,<attempt>,<pid>,<time.time()>    it raised its planned failure
    CANCEL,<job id>,<attempt>,<pid>,<time.time()>  the worker stopped it (timeout,
                                                   cancel, hand-back, fence)

The end line is written in a ``finally``, so every execution that its process
survived has one; a START without an end is an execution that its process's
death cut short. Each line is one ``os.write`` on an ``O_APPEND`` descriptor, so
lines from concurrent worker processes never interleave, and a kill cannot
leave half a line behind.

Two executors do the same work: ``chaos`` is a coroutine (the worker cancels
it), ``chaos_sync`` a plain function in one of the worker's threads (it cannot
be interrupted, so it waits on ``cancel_event`` and returns once that is set:
its end line comes at once when the worker gives up on it). The payload says
what a job does:

    sleep_ms    how long it works (else a random 0 to ``max_sleep_ms``)
    fail_times  attempts 1 to fail_times raise PlannedFailure (retryable)
    plan        what the suite expects of the job, for the judgement only
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Mapping
from typing import Any

from orchestrix import JobContext, executor

RECORDS_ENV = "ORX_CHAOS_RECORDS"
JOB_TYPE = "chaos"
SYNC_JOB_TYPE = "chaos_sync"
PLANNED_FAILURE = "PlannedFailure"


class PlannedFailure(Exception):
    """The failure a job's payload asks for (``fail_times``); retryable like any exception."""


def record(kind: str, job_id: str, attempt: int) -> None:
    """Append one line for this process; a no-op when the variable is not set."""
    path = os.environ.get(RECORDS_ENV)
    if not path:
        return
    line = f"{kind},{job_id},{attempt},{os.getpid()},{time.time():.6f}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def sleep_seconds(payload: Mapping[str, Any]) -> float:
    """How long the job works: ``sleep_ms`` exactly, else a random 0 to ``max_sleep_ms``."""
    if "sleep_ms" in payload:
        return float(payload["sleep_ms"]) / 1000
    return random.uniform(0, float(payload.get("max_sleep_ms", 0))) / 1000


def outcome(job: JobContext) -> dict[str, Any]:
    """The result, or the planned failure of this attempt (raised)."""
    if job.attempt <= int(job.payload.get("fail_times", 0)):
        raise PlannedFailure(f"attempt {job.attempt} fails as planned")
    return {"pid": os.getpid()}


@executor(JOB_TYPE)
async def chaos(job: JobContext) -> Any:
    """Record the start, work for the payload's time, record how it ended."""
    record("START", job.id, job.attempt)
    end = "CANCEL"  # anything but a return or the planned failure: the worker stopped it
    try:
        await asyncio.sleep(sleep_seconds(job.payload))
        end = "FAIL"
        result = outcome(job)
        end = "END"
        return result
    finally:
        record(end, job.id, job.attempt)


@executor(SYNC_JOB_TYPE)
def chaos_sync(job: JobContext) -> Any:
    """The same in a thread: the wait ends early when the worker gives up on the attempt."""
    record("START", job.id, job.attempt)
    end = "CANCEL"
    try:
        if job.cancel_event.wait(sleep_seconds(job.payload)):
            return None  # the worker ignores it: it timed out, cancelled or handed back
        end = "FAIL"
        result = outcome(job)
        end = "END"
        return result
    finally:
        record(end, job.id, job.attempt)
