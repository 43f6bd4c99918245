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

import orjson

from orchestrix.models import Job

MAX_PROGRESS_BYTES = 65_536
# The largest result an attempt may return, as JSON: a larger one fails the job
# (InvalidResult), so that no response or row grows without bound.
MAX_RESULT_BYTES = 1024 * 1024
# A snooze or a timeout extension: at most a week (the longest timeout_seconds).
MAX_SNOOZE_OR_EXTENSION_S = 7 * 24 * 3600


class Snooze(Exception):
    """Raise from an executor to run the job again after ``seconds``, without using up
    an attempt: it goes back to PENDING, due then, its attempt not counted."""

    def __init__(self, seconds: float) -> None:
        if not 0 < seconds <= MAX_SNOOZE_OR_EXTENSION_S:
            raise ValueError(f"Snooze: seconds must be in (0, {MAX_SNOOZE_OR_EXTENSION_S}]")
        super().__init__(f"snoozed for {seconds:g} s")
        self.seconds = float(seconds)


class Controls:
    """Set by the worker running an attempt: where its reports go."""

    def __init__(self) -> None:
        self.report: Callable[[bytes], None] | None = None  # the latest progress, as JSON
        self.extend: Callable[[float], None] | None = None  # seconds more from now


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
    # For a workflow's job: each parent's result, by the parent's key in the
    # workflow (all of them SUCCEEDED, or the job would not run). Empty otherwise.
    parents: Mapping[str, Any] = field(default_factory=dict)
    workflow_id: str | None = None
    # Set when the attempt should stop (timeout, shutdown): a plain-function
    # executor cannot be interrupted, so long loops should check it.
    cancel_event: threading.Event = field(default_factory=threading.Event, compare=False)
    # How the worker hears progress and timeout extensions (none outside a worker).
    controls: Controls = field(default_factory=lambda: Controls(), compare=False, repr=False)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def progress(self, value: Any) -> None:
        """Report progress: any JSON value (at most MAX_PROGRESS_BYTES), shown on the
        job as ``progress``. Only the latest report counts; the worker writes it at
        most once a second while the attempt runs. Callable from a thread."""
        try:
            data = orjson.dumps(value)
        except TypeError as exc:
            raise ValueError(f"progress must be a JSON value: {exc}") from None
        if len(data) > MAX_PROGRESS_BYTES:
            raise ValueError(f"progress must be at most {MAX_PROGRESS_BYTES} bytes of JSON")
        if self.controls.report is not None:
            self.controls.report(data)

    def extend_timeout(self, seconds: float) -> None:
        """Let this attempt run ``seconds`` more from now (never less than it had).
        The job's ``timeout_seconds`` is unchanged: the next attempt starts with it.
        Callable from a thread."""
        if not 0 < seconds <= MAX_SNOOZE_OR_EXTENSION_S:
            raise ValueError(f"seconds must be in (0, {MAX_SNOOZE_OR_EXTENSION_S}]")
        if self.controls.extend is not None:
            self.controls.extend(seconds)

    @classmethod
    def of(cls, job: Job, parents: Mapping[str, Any] | None = None) -> JobContext:
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
            parents=parents or {},
            workflow_id=job.workflow_id,
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


def load(modules: tuple[str, ...], *, demo: bool = False) -> None:
    """Import the user's modules, which register their executors, and with
    ``demo`` the demo executors (WORKER_DEMO_EXECUTORS; orchestrix.builtin)."""
    if demo:
        importlib.import_module("orchestrix.builtin")
    for module in modules:
        importlib.import_module(module)
