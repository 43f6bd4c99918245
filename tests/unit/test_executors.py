from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from orchestrix import PermanentError, executor
from orchestrix.errors import Kind
from orchestrix.executors import MAX_RESULT_BYTES, JobContext, Registry, registry
from orchestrix.services.worker.runner import Failure, Success, run
from orchestrix.services.worker.threads import Threads


def context(job_type: str = "t", timeout_seconds: int = 5, **payload: Any) -> JobContext:
    return JobContext(
        id="01KG94QDSXNW96W84543ZG5PY5",
        type=job_type,
        queue="default",
        payload=payload,
        attempt=1,
        max_attempts=3,
        timeout_seconds=timeout_seconds,
        created_at=datetime.now(UTC),
    )


@pytest.fixture(scope="module")
def threads() -> Any:
    pool = Threads(2)
    yield pool
    pool.shutdown()


def test_the_decorator_registers_in_the_default_registry() -> None:
    @executor("unit_test_type")
    def fn(job: JobContext) -> int:
        return 1

    found = registry.get("unit_test_type")
    assert found is not None
    assert found.fn is fn
    assert not found.is_async


def test_registering_a_type_twice_is_refused() -> None:
    local = Registry()

    async def one(job: JobContext) -> None: ...
    async def two(job: JobContext) -> None: ...

    local.register("x", one)
    local.register("x", one)  # the same function again is fine (module re-import)
    with pytest.raises(ValueError, match="already registered"):
        local.register("x", two)
    assert local.types() == ["x"]


async def test_async_and_plain_functions(threads: Threads) -> None:
    local = Registry()
    loop_thread = threading.get_ident()

    async def on_loop(job: JobContext) -> dict[str, Any]:
        return {"thread": threading.get_ident() == loop_thread, **job.payload}

    def in_thread(job: JobContext) -> dict[str, Any]:
        return {"thread": threading.get_ident() == loop_thread}

    local.register("a", on_loop)
    local.register("p", in_thread)
    assert await run(local.get("a"), context(n=1), threads) == Success({"thread": True, "n": 1})
    assert await run(local.get("p"), context(), threads) == Success({"thread": False})


async def test_failures_are_classified(threads: Threads) -> None:
    local = Registry()

    async def boom(job: JobContext) -> None:
        raise RuntimeError("flaky network")

    def permanent(job: JobContext) -> None:
        raise PermanentError("bad input")

    async def not_json(job: JobContext) -> object:
        return {"when": object()}

    local.register("boom", boom)
    local.register("perm", permanent)
    local.register("obj", not_json)
    assert await run(local.get("boom"), context(), threads) == Failure(
        "RuntimeError: flaky network", Kind.RETRYABLE
    )
    assert await run(local.get("perm"), context(), threads) == Failure(
        "PermanentError: bad input", Kind.PERMANENT
    )
    outcome = await run(local.get("obj"), context(), threads)
    assert isinstance(outcome, Failure)
    assert outcome.kind is Kind.PERMANENT
    assert outcome.error.startswith("InvalidResult: the result cannot be stored as JSON")

    async def huge(job: JobContext) -> str:
        return "x" * MAX_RESULT_BYTES  # two bytes more as JSON, with its quotes

    async def just_fits(job: JobContext) -> str:
        return "x" * (MAX_RESULT_BYTES - 2)

    local.register("huge", huge)
    local.register("fits", just_fits)
    too_big = await run(local.get("huge"), context(), threads)
    assert too_big == Failure(
        f"InvalidResult: the result is {MAX_RESULT_BYTES + 2:,} bytes of JSON, more than the "
        f"{MAX_RESULT_BYTES:,} allowed",
        Kind.PERMANENT,
    )
    assert isinstance(await run(local.get("fits"), context(), threads), Success)
    missing = await run(None, context("ghost"), threads)
    assert missing == Failure(
        "NoExecutor: no executor is registered for job type 'ghost'", Kind.PERMANENT
    )


async def test_timeouts_are_retryable_and_flag_the_job(threads: Threads) -> None:
    local = Registry()

    async def slow(job: JobContext) -> None:
        await asyncio.sleep(10)

    def slow_thread(job: JobContext) -> None:
        # Cooperative: a plain function sees the flag and stops.
        while not job.cancelled:
            time.sleep(0.01)

    local.register("slow", slow)
    local.register("slow_thread", slow_thread)
    for job_type in ("slow", "slow_thread"):
        job = context(job_type, timeout_seconds=1)
        started = time.monotonic()
        outcome = await run(local.get(job_type), job, threads)
        assert outcome == Failure("JobTimeout: the attempt ran longer than 1 s", Kind.RETRYABLE)
        assert 0.9 < time.monotonic() - started < 3
        assert job.cancelled


async def test_a_function_waiting_on_the_cancel_event_is_woken_by_the_timeout(
    threads: Threads,
) -> None:
    """A plain function that waits on ``job.cancel_event`` returns as soon as the
    attempt times out, and an attempt nobody stopped reads as not cancelled."""
    local = Registry()

    def waits(job: JobContext) -> bool:
        return job.cancel_event.wait(10)

    local.register("waits", waits)
    job = context("waits", timeout_seconds=1)
    started = time.monotonic()
    outcome = await run(local.get("waits"), job, threads)
    assert isinstance(outcome, Failure)
    assert outcome.error.startswith("JobTimeout")
    assert job.cancelled
    # The function itself returned as soon as the flag was set, not after 10 s.
    while threads.abandoned:
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.01)
    untouched = context()
    assert not untouched.cancelled
    assert untouched.cancel_event is untouched.cancel_event


async def test_demo_job(threads: Threads) -> None:
    from orchestrix import builtin  # noqa: F401  (registers demo_job)

    demo = registry.get("demo_job")
    assert await run(demo, context("demo_job", message="hi"), threads) == Success({"message": "hi"})
    assert await run(demo, context("demo_job", fail="permanent"), threads) == Failure(
        "PermanentError: demo_job was asked to fail permanently", Kind.PERMANENT
    )
    retryable = await run(demo, context("demo_job", fail="retryable"), threads)
    assert retryable == Failure(
        "DemoFailure: demo_job was asked to fail (attempt 1)", Kind.RETRYABLE
    )
    for bad in ({"sleep_ms": "x"}, {"sleep_ms": -1}, {"fail": "sometimes"}):
        outcome = await run(demo, context("demo_job", **bad), threads)
        assert isinstance(outcome, Failure)
        assert outcome.kind is Kind.PERMANENT
        assert outcome.error.startswith("InvalidPayload")
    started = time.monotonic()
    assert await run(demo, context("demo_job", sleep_ms=50), threads) == Success({"sleep_ms": 50})
    assert time.monotonic() - started >= 0.05
