"""Runs one attempt of a job under its timeout and says what came of it.

Never raises for anything the executor does: every failure becomes a
:class:`Failure` with its classification, and a ``Snooze`` a :class:`Snoozed`.
Only cancellation (a worker handing the job back) propagates. An executor may
extend its own timeout (``job.extend_timeout``) while it runs.

A plain function's timeout starts once it runs in a thread: waiting for one
(they are all held by stuck functions) never counts against the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from orchestrix.errors import Kind, classify, describe
from orchestrix.executors import MAX_RESULT_BYTES, Executor, JobContext, Snooze
from orchestrix.services.worker.threads import Threads


@dataclass(frozen=True)
class Success:
    result: Any


@dataclass(frozen=True)
class Failure:
    error: str
    kind: Kind


@dataclass(frozen=True)
class Snoozed:
    """Run the job again after ``delay_s``; this attempt is not counted."""

    delay_s: float


Outcome = Success | Failure | Snoozed


async def run(executor: Executor | None, job: JobContext, threads: Threads) -> Outcome:
    if executor is None:
        return Failure(
            f"NoExecutor: no executor is registered for job type {job.type!r}", Kind.PERMANENT
        )
    try:
        if executor.is_async:
            async with asyncio.timeout(job.timeout_seconds) as deadline:
                with _extendable(job, deadline):
                    result = await executor.fn(job)
        else:
            result = await _in_thread(executor, job, threads)
    except Snooze as snooze:
        return Snoozed(snooze.seconds)
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
        size = len(orjson.dumps(result))
    except TypeError as exc:
        return Failure(f"InvalidResult: the result cannot be stored as JSON: {exc}", Kind.PERMANENT)
    if size > MAX_RESULT_BYTES:
        return Failure(
            f"InvalidResult: the result is {size:,} bytes of JSON, more than the "
            f"{MAX_RESULT_BYTES:,} allowed",
            Kind.PERMANENT,
        )
    return Success(result)


async def _in_thread(executor: Executor, job: JobContext, threads: Threads) -> Any:
    # The function may extend its timeout before its clock starts (that is, before
    # start() returns): such extensions are applied once it does.
    loop = asyncio.get_running_loop()
    early: list[float] = []
    job.controls.extend = lambda seconds: early.append(loop.time() + seconds)
    call = await threads.start(functools.partial(executor.fn, job))
    try:
        async with asyncio.timeout(job.timeout_seconds) as deadline:
            with _extendable(job, deadline, early):
                return await call.result()
    finally:
        # Timed out or cancelled: the thread stays taken, counted as abandoned,
        # until the function returns. (Nothing happens if it has returned.)
        call.abandon()


@contextlib.contextmanager
def _extendable(
    job: JobContext, deadline: asyncio.Timeout, early: Sequence[float] = ()
) -> Iterator[None]:
    """While in this block, ``job.extend_timeout`` moves ``deadline`` (from any thread);
    ``early``: deadlines (loop time) asked for before the block."""
    loop = asyncio.get_running_loop()

    def move(when: float) -> None:
        current = deadline.when()
        if current is not None and when > current and not deadline.expired():
            with contextlib.suppress(RuntimeError):  # the block has just ended
                deadline.reschedule(when)

    def extend(seconds: float) -> None:
        when = loop.time() + seconds
        loop.call_soon_threadsafe(move, when)

    job.controls.extend = extend
    if early:
        move(max(early))
    try:
        yield
    finally:
        job.controls.extend = None
