"""The chaos suite's executor: every execution leaves a START and an END line in a file.

A worker killed with SIGKILL loses everything in memory and may lose its
database writes, but lines already written to a file stay. The file named by
``ORX_CHAOS_RECORDS`` therefore holds the true history of executions:

    START,<job id>,<attempt>,<pid>,<time.time()>   before the work begins
    END,<job id>,<attempt>,<pid>,<time.time()>     after it is done
    CANCEL,<job id>,<attempt>,<pid>,<time.time()>  when the worker cancelled it
                                                   (timeout, hand-back on SIGTERM)

A START without an END or CANCEL is an execution that its process's death cut
short. Each line is one ``os.write`` on an ``O_APPEND`` descriptor, so lines
from concurrent worker processes never interleave, and a kill cannot leave half
a line behind.
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


@executor(JOB_TYPE)
async def chaos(job: JobContext) -> Any:
    """Record the start, work for the payload's time, record the end; always succeeds."""
    record("START", job.id, job.attempt)
    try:
        await asyncio.sleep(sleep_seconds(job.payload))
    except asyncio.CancelledError:
        record("CANCEL", job.id, job.attempt)
        raise
    record("END", job.id, job.attempt)
    return {"pid": os.getpid()}
