"""The executor SDK: what user code writes against.

    from orchestrix import executor, PermanentError

    @executor("send_email")
    async def send_email(job):
        if "to" not in job.payload:
            raise PermanentError("payload needs 'to'")
        ...
        return {"sent": True}

An executor receives a :class:`JobContext` and returns a JSON-able result.
Async functions run on the worker's event loop; plain functions run in a thread
so they cannot block it. A worker imports the modules named in
``ORCHESTRIX_EXECUTORS`` (or ``--executors``), whose decorators register here.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from orchestrix.models import Job


@dataclass(frozen=True)
class JobContext:
    """What an executor knows about the attempt it runs."""

    id: str
    type: str
    queue: str
    payload: Mapping[str, Any]
    attempt: int
    max_attempts: int
    timeout_seconds: int
    created_at: datetime
    # For a job a cron schedule created: the schedule's name and the tick's
    # nominal time (when it was due, not when it fired).
    schedule: str | None = None
    tick_at: datetime | None = None
    # Set when the attempt should stop (timeout, shutdown): a plain-function
    # executor cannot be interrupted, so long loops should check it.
    cancel_event: threading.Event = field(default_factory=threading.Event, compare=False)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @classmethod
    def of(cls, job: Job) -> JobContext:
        return cls(
            id=job.id,
            type=job.type,
            queue=job.queue,
            payload=job.payload,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            timeout_seconds=job.timeout_seconds,
            created_at=job.created_at,
            schedule=job.schedule,
            tick_at=job.tick_at,
        )


ExecutorFn = Callable[[JobContext], Any] | Callable[[JobContext], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Executor:
    type: str
    fn: Callable[[JobContext], Any]
    is_async: bool


class Registry:
    """Job type → executor."""

    def __init__(self) -> None:
        self._executors: dict[str, Executor] = {}

    def register(self, job_type: str, fn: Callable[[JobContext], Any]) -> None:
        existing = self._executors.get(job_type)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"an executor for job type {job_type!r} is already registered")
        self._executors[job_type] = Executor(job_type, fn, inspect.iscoroutinefunction(fn))

    def get(self, job_type: str) -> Executor | None:
        return self._executors.get(job_type)

    def types(self) -> list[str]:
        return sorted(self._executors)


# The registry the decorator fills: user modules register by being imported.
registry = Registry()


def executor(job_type: str) -> Callable[[F], F]:
    """Register the decorated function as the executor of ``job_type``."""

    def register(fn: F) -> F:
        registry.register(job_type, fn)
        return fn

    return register


def load(modules: tuple[str, ...]) -> None:
    """Import the built-in executors and the user's modules, which register theirs."""
    importlib.import_module("orchestrix.builtin")
    for module in modules:
        importlib.import_module(module)
