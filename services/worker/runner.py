"""Runs one attempt of a job under its timeout and says what came of it.

Never raises for anything the executor does: every failure becomes a
:class:`Failure` with its classification. Only cancellation (a worker handing
the job back) propagates.

A plain function's timeout starts once it runs in a thread: waiting for one
(they are all held by stuck functions) never counts against the attempt.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import orjson
from orchestrix.errors import Kind, classify, describe
from orchestrix.executors import Executor, JobContext
from orchestrix.services.worker.threads import Threads


@dataclass(frozen=True)
class Success:
    result: Any


@dataclass(frozen=True)
class Failure:
    error: str
    kind: Kind


Outcome = Success | Failure


async def run(executor: Executor | None, job: JobContext, threads: Threads) -> Outcome:
    if executor is None:
        return Failure(
            f"NoExecutor: no executor is registered for job type {job.type!r}", Kind.PERMANENT
        )
    try:
        if executor.is_async:
            async with asyncio.timeout(job.timeout_seconds):
                result = await executor.fn(job)
        else:
            result = await _in_thread(executor, job, threads)
    except TimeoutError:
        # A thread cannot be interrupted: the flag asks it to stop, and its
        # eventual result is ignored.
        job.cancel_event.set()
        return Failure(
            f"JobTimeout: the attempt ran longer than {job.timeout_seconds} s", Kind.RETRYABLE
        )
    except asyncio.CancelledError:
        job.cancel_event.set()
        raise
    except Exception as exc:  # the executor's failure is the job's, never the worker's
        return Failure(describe(exc), classify(exc))
    try:
        orjson.dumps(result)
    except TypeError as exc:
        return Failure(f"InvalidResult: the result cannot be stored as JSON: {exc}", Kind.PERMANENT)
    return Success(result)


async def _in_thread(executor: Executor, job: JobContext, threads: Threads) -> Any:
    call = await threads.start(functools.partial(executor.fn, job))
    try:
        async with asyncio.timeout(job.timeout_seconds):
            return await call.result()
    finally:
        # Timed out or cancelled: the thread stays taken, counted as abandoned,
        # until the function returns. (Nothing happens if it has returned.)
        call.abandon()
