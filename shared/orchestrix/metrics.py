"""Prometheus metrics, one class per service, each on its own registry.

A registry per process (not the library's global one) lets tests build several
applications in one interpreter. Labels are bounded: HTTP route templates and
methods, and job types and queues that are *known* (``KnownLabels``); never a job
id, and never a type or queue a client made up. Every other type or queue is
counted under ``other``.

A labelled counter has no series until its first increment, and a query or an
alert over a missing series sees nothing rather than 0 (``rate()`` of a failure
count that appears with its first failure misses that failure). So each service
presets its counters at 0 for the types and queues it knows of at start.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from itertools import product

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrix.models import DEFAULT_QUEUE, Job
from orchestrix.states import TERMINAL, JobState

__all__ = [
    "CONTENT_TYPE_LATEST",
    "MAX_LABEL_VALUES",
    "OTHER",
    "ApiMetrics",
    "KnownLabels",
    "SchedulerMetrics",
    "WorkerMetrics",
    "expose",
]

log = logging.getLogger("metrics")

# The label value of every job type and queue that is not known.
OTHER = "other"
# The most job types, and the most queues, one process ever labels (each): the last
# line of defence should the known values themselves grow without bound.
MAX_LABEL_VALUES = 200
# HTTP methods a label may name; aiohttp accepts any token as a method.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class KnownLabels:
    """The job types and queues this process may use as label values.

    Known are: ``default``, the queues in METRICS_QUEUES, and what the process is
    told (``learn``): a worker its own executors' types and WORKER_QUEUES; every
    service, periodically, the types and queues the live workers registered
    (``orchestrix.labels``). A type or queue a client chose is not known until a
    worker serves it. Known values are never forgotten (a counter's series must
    not vanish), and at most ``max_values`` of each are ever known; the rest are
    ``other``.
    """

    def __init__(self, queues: Iterable[str] = (), max_values: int = MAX_LABEL_VALUES) -> None:
        self._max = max_values
        self._types: set[str] = set()
        self._queues: set[str] = set()
        self._full: set[str] = set()
        self.learn((), (DEFAULT_QUEUE, *queues))

    def learn(self, types: Iterable[str], queues: Iterable[str]) -> None:
        self._add("type", self._types, types)
        self._add("queue", self._queues, queues)

    def _add(self, kind: str, known: set[str], values: Iterable[str]) -> None:
        for value in values:
            if value in known:
                continue
            if len(known) >= self._max:
                if kind not in self._full:
                    self._full.add(kind)
                    log.warning(
                        "too many label values; the rest are counted as other",
                        extra={"label": kind, "limit": self._max},
                    )
                return
            known.add(value)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self._types)

    @property
    def queues(self) -> frozenset[str]:
        return frozenset(self._queues)

    def queue(self, queue: str) -> str:
        return queue if queue in self._queues else OTHER

    def job(self, job_type: str, queue: str) -> tuple[str, str]:
        """The (type, queue) label values of a job."""
        return (
            job_type if job_type in self._types else OTHER,
            queue if queue in self._queues else OTHER,
        )


def http_method(method: str) -> str:
    return method if method in HTTP_METHODS else OTHER


# HTTP handlers answer in milliseconds; the top buckets catch a stalled database.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


DEPENDENCIES = ("postgres", "nats")


def _dependency_up(registry: CollectorRegistry) -> Gauge:
    gauge = Gauge(
        "orchestrix_dependency_up",
        "1 if this process reached the dependency when it was last scraped, else 0.",
        ["dependency"],
        registry=registry,
    )
    for name in DEPENDENCIES:
        gauge.labels(name)
    return gauge


def record_dependencies(gauge: Gauge, checks: dict[str, str]) -> None:
    """Set ``orchestrix_dependency_up`` from a readiness check's answers."""
    for name in DEPENDENCIES:
        gauge.labels(name).set(1 if checks.get(name) == "ok" else 0)


class ApiMetrics:
    """Nothing is preset: the API loads no executors, so it knows no job types at
    start, and its counters are all per type and queue. Each series appears with its
    first job; the types it knows are those the live workers serve (``known``)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, known: KnownLabels | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.known = known or KnownLabels()
        self.dependency_up = _dependency_up(self.registry)
        self.jobs_created = Counter(
            "orchestrix_jobs_created_total",
            "Jobs created through the API.",
            ["type", "queue"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "orchestrix_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "orchestrix_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )

        self.jobs_cancelled = Counter(
            "orchestrix_jobs_cancelled_total",
            "Jobs cancelled through the API.",
            ["type", "queue"],
            registry=self.registry,
        )

    def count_created(self, jobs: Iterable[Job]) -> int:
        """Count ``jobs`` as created: one counter update per type and queue, not per
        job (each ``labels()`` takes a lock). Returns how many there were."""
        created = collections.Counter(self.known.job(job.type, job.queue) for job in jobs)
        for labels, n in created.items():
            self.jobs_created.labels(*labels).inc(n)
        return created.total()


# Jobs run from milliseconds to hours: the buckets span both.
_JOB_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    1800,
    3600,
    7200,
    14400,
    43200,
    86400,
)
# Waiting to start: milliseconds when idle, minutes when a backlog builds.
_LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)


# The states the rescuer gives a job it takes back (see db.jobs.rescue_expired).
RESCUED_STATES = (JobState.RETRYING, JobState.FAILED, JobState.CANCELLED)


class SchedulerMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, known: KnownLabels | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.known = known or KnownLabels()
        self.dependency_up = _dependency_up(self.registry)
        self.queue_depth = Gauge(
            "orchestrix_queue_depth",
            "Jobs waiting to run (PENDING or RETRYING), per queue.",
            ["queue"],
            registry=self.registry,
        )
        self.oldest_waiting = Gauge(
            "orchestrix_queue_oldest_waiting_seconds",
            "How long the longest-waiting due job of each queue has waited.",
            ["queue"],
            registry=self.registry,
        )
        self.jobs_rescued = Counter(
            "orchestrix_jobs_rescued_total",
            "Running jobs taken back from a dead worker or an expired lease, by the state given.",
            ["queue", "state"],
            registry=self.registry,
        )
        self.handbacks_applied = Counter(
            "orchestrix_handbacks_applied_total",
            "Attempts handed back from the ledger: returned by workers that had to exit "
            "while PostgreSQL was away.",
            registry=self.registry,
        )
        self.workers_lost = Counter(
            "orchestrix_workers_lost_total",
            "Workers found dead by the lifeline (PostgreSQL session and NATS connection gone).",
            registry=self.registry,
        )
        self.schedule_ticks = Counter(
            "orchestrix_schedule_ticks_total",
            "Cron ticks handled by this scheduler: created (a job), missed (older than the "
            "catch-up window, no job), overlapped (the previous job unfinished, no job).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("created", "missed", "overlapped"):
            self.schedule_ticks.labels(outcome)
        self.jobs_pruned = Counter(
            "orchestrix_jobs_pruned_total",
            "Finished jobs deleted by the pruner once their state's retention had passed.",
            ["state"],
            registry=self.registry,
        )
        for state in sorted(TERMINAL):
            self.jobs_pruned.labels(state.value)

    def preset(self, queues: Iterable[str]) -> None:
        """Export the per-queue counters at 0 for ``queues`` (as their labels)."""
        for queue in {self.known.queue(queue) for queue in queues}:
            for state in RESCUED_STATES:
                self.jobs_rescued.labels(queue, state.value)


class WorkerMetrics:
    def __init__(
        self,
        concurrency: int,
        registry: CollectorRegistry | None = None,
        known: KnownLabels | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.known = known or KnownLabels()
        self.dependency_up = _dependency_up(self.registry)
        labels = ["type", "queue"]
        self.jobs_claimed = Counter(
            "orchestrix_jobs_claimed_total",
            "Job attempts this worker claimed (moved to RUNNING).",
            labels,
            registry=self.registry,
        )
        self.claim_duration = Histogram(
            "orchestrix_worker_claim_duration_seconds",
            "Time to claim one batch of due jobs.",
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.jobs_succeeded = Counter(
            "orchestrix_jobs_succeeded_total",
            "Jobs that succeeded.",
            labels,
            registry=self.registry,
        )
        self.jobs_failed = Counter(
            "orchestrix_jobs_failed_total",
            "Jobs that failed for good.",
            labels,
            registry=self.registry,
        )
        self.jobs_retried = Counter(
            "orchestrix_jobs_retried_total",
            "Failed attempts that will be retried.",
            labels,
            registry=self.registry,
        )
        self.jobs_handed_back = Counter(
            "orchestrix_jobs_handed_back_total",
            "Running attempts returned unfinished (to PENDING) by a stopping worker.",
            labels,
            registry=self.registry,
        )
        self.jobs_snoozed = Counter(
            "orchestrix_jobs_snoozed_total",
            "Attempts whose executor asked to run again later (Snooze): not counted.",
            labels,
            registry=self.registry,
        )
        self.jobs_cancelled = Counter(
            "orchestrix_jobs_cancelled_while_running_total",
            "Running jobs that ended CANCELLED because a user cancelled them.",
            labels,
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "orchestrix_job_duration_seconds",
            "Time an attempt ran, by outcome.",
            [*labels, "outcome"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.start_latency = Histogram(
            "orchestrix_job_start_latency_seconds",
            "From when a job became due (created, or its run_at) to when its attempt started.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.slots = Gauge(
            "orchestrix_worker_slots",
            "Jobs this worker may run at once.",
            registry=self.registry,
        )
        self.slots.set(concurrency)
        self.slots_busy = Gauge(
            "orchestrix_worker_slots_busy",
            "Jobs this worker is running now.",
            registry=self.registry,
        )

    def preset(self, types: Iterable[str], queues: Iterable[str]) -> None:
        """Export every outcome counter at 0 for each of ``types`` in each of ``queues``.

        They become known label values (a worker knows its executors and queues).
        """
        types, queues = tuple(types), tuple(queues)
        self.known.learn(types, queues)
        pairs = {self.known.job(t, q) for t, q in product(types, queues)}
        counters = (
            self.jobs_claimed,
            self.jobs_succeeded,
            self.jobs_failed,
            self.jobs_retried,
            self.jobs_handed_back,
            self.jobs_snoozed,
            self.jobs_cancelled,
        )
        for job_type, queue in sorted(pairs):
            for counter in counters:
                counter.labels(job_type, queue)


def expose(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
