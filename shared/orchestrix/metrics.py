"""Prometheus metrics, one class per service, each on its own registry.

A registry per process (not the library's global one) lets tests build several
applications in one interpreter. Labels are bounded: job type and queue, HTTP
route templates; never a job id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics", "expose"]

# HTTP handlers answer in milliseconds; the top buckets catch a stalled database.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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


def expose(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
