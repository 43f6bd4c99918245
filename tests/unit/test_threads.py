"""Plain-function executors whose attempt was given up keep their thread until they return.

The functions here ignore their cancel flag and block on an event the test
sets, as a stuck call to a library would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from orchestrix.errors import Kind
from orchestrix.executors import Executor, JobContext, Registry
from orchestrix.services.worker.runner import Failure, Success, run
from orchestrix.services.worker.threads import Threads

# No function here blocks longer than this, even if a test fails before releasing it.
BLOCK_S = 30.0
WAIT_S = 5.0
TIMED_OUT = Failure("JobTimeout: the attempt ran longer than 1 s", Kind.RETRYABLE)


def context(job_type: str, timeout_seconds: int = 1) -> JobContext:
    return JobContext(
        id="01KG94QDSXNW96W84543ZG5PY5",
        type=job_type,
        queue="default",
        payload={},
        attempt=1,
        max_attempts=3,
        timeout_seconds=timeout_seconds,
        created_at=datetime.now(UTC),
    )


class Stuck:
    """A plain-function executor that ignores ``job.cancelled`` until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        registry = Registry()
        registry.register("stuck", self.fn)
        found = registry.get("stuck")
        assert found is not None
        self.executor: Executor = found

    def fn(self, job: JobContext) -> str:
        self.started.set()
        self.release.wait(BLOCK_S)
        return "released"


@pytest.fixture
def stuck() -> Iterator[Stuck]:
    executor = Stuck()
    yield executor
    executor.release.set()


def plain(fn: Callable[[JobContext], object]) -> Executor:
    registry = Registry()
    registry.register("plain", fn)
    found = registry.get("plain")
    assert found is not None
    return found


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        await asyncio.sleep(0.01)


async def test_a_timed_out_function_keeps_its_thread_until_it_returns(stuck: Stuck) -> None:
    threads = Threads(2)
    try:
        job = context("stuck")
        assert await run(stuck.executor, job, threads) == TIMED_OUT
        assert job.cancelled  # asked to stop, though this one does not listen
        assert (threads.taken, threads.abandoned, threads.free) == (1, 1, 1)
        stuck.release.set()
        await until(lambda: threads.abandoned == 0, "returned")
        assert (threads.taken, threads.free) == (0, 2)
    finally:
        threads.shutdown()


async def test_a_cancelled_attempt_keeps_its_thread_until_the_function_returns(
    stuck: Stuck,
) -> None:
    threads = Threads(1)
    try:
        job = context("stuck", timeout_seconds=60)
        attempt = asyncio.create_task(run(stuck.executor, job, threads))
        await until(stuck.started.is_set, "started")
        attempt.cancel()  # a hand-back, or a user's cancel
        with pytest.raises(asyncio.CancelledError):
            await attempt
        assert job.cancelled
        assert (threads.taken, threads.abandoned, threads.free) == (1, 1, 0)
        stuck.release.set()
        await until(lambda: threads.abandoned == 0, "returned")
        assert threads.free == 1
    finally:
        threads.shutdown()


async def test_an_attempt_waits_for_a_thread_and_its_clock_starts_with_it(stuck: Stuck) -> None:
    threads = Threads(2)
    try:
        for outcome in await asyncio.gather(
            run(stuck.executor, context("stuck"), threads),
            run(stuck.executor, context("stuck"), threads),
        ):
            assert outcome == TIMED_OUT
        assert (threads.abandoned, threads.free) == (2, 0)

        started_at: list[float] = []

        def quick(job: JobContext) -> str:
            started_at.append(time.monotonic())
            return "ran"

        queued_at = time.monotonic()
        attempt = asyncio.create_task(run(plain(quick), context("plain"), threads))
        # Past its 1 s timeout, and still waiting: the wait is not the attempt's.
        done, _ = await asyncio.wait({attempt}, timeout=1.5)
        assert not done, f"the attempt ended before it had a thread: {attempt.result()}"
        assert not started_at
        stuck.release.set()
        assert await asyncio.wait_for(attempt, WAIT_S) == Success("ran")
        assert started_at[0] - queued_at >= 1.5
        await until(lambda: threads.free == 2, "free")
        assert threads.abandoned == 0
    finally:
        threads.shutdown()


async def test_an_attempt_cancelled_while_waiting_never_runs(stuck: Stuck) -> None:
    threads = Threads(1)
    try:
        assert await run(stuck.executor, context("stuck"), threads) == TIMED_OUT
        ran: list[str] = []

        def record(job: JobContext) -> str:
            ran.append(job.type)
            return job.type

        job = context("plain", timeout_seconds=60)
        waiting = asyncio.create_task(run(plain(record), job, threads))
        after = asyncio.create_task(run(plain(record), context("plain"), threads))
        # Both wait, the second past its 1 s timeout.
        done, _ = await asyncio.wait({waiting, after}, timeout=1.5)
        assert not done, [task.result() for task in done]
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert job.cancelled
        stuck.release.set()
        # The thread goes to the next in line, and the cancelled one never ran.
        assert await asyncio.wait_for(after, WAIT_S) == Success("plain")
        assert ran == ["plain"]
        await until(lambda: threads.free == 1, "free")
    finally:
        threads.shutdown()


def test_the_process_exits_with_a_stuck_thread() -> None:
    """The worker shuts its pool down and exits; a stuck function does not hold it up."""
    script = textwrap.dedent(
        """
        import asyncio
        import threading
        from datetime import UTC, datetime

        from orchestrix.executors import JobContext, Registry

        from orchestrix.services.worker.runner import run
        from orchestrix.services.worker.threads import Threads


        def forever(job):
            threading.Event().wait()


        async def main():
            registry = Registry()
            registry.register("forever", forever)
            job = JobContext("01KG94QDSXNW96W84543ZG5PY5", "forever", "default", {}, 1, 3, 1,
                             datetime.now(UTC))
            threads = Threads(1)
            print((await run(registry.get("forever"), job, threads)).error, flush=True)
            threads.shutdown()


        asyncio.run(main())
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("JobTimeout")
