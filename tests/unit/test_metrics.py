"""Counters that dashboards and alerts query exist at 0 before their first event."""

from __future__ import annotations

from orchestrix.metrics import RESCUED_STATES, SchedulerMetrics, WorkerMetrics, expose
from prometheus_client import CollectorRegistry, Counter


def _counters(holder: object) -> list[Counter]:
    return [value for value in vars(holder).values() if isinstance(value, Counter)]


def _labels(counter: Counter) -> tuple[str, ...]:
    return tuple(getattr(counter, "_labelnames", ()))  # not public in prometheus_client


def test_a_fresh_worker_exports_every_outcome_counter_at_zero() -> None:
    metrics = WorkerMetrics(concurrency=1, registry=CollectorRegistry())
    metrics.preset(["demo_job", "noop"], ("default",))
    text = expose(metrics.registry).decode()
    assert 'orchestrix_jobs_failed_total{queue="default",type="demo_job"} 0.0' in text
    assert 'orchestrix_jobs_failed_total{queue="default",type="noop"} 0.0' in text
    # Every per-type-and-queue counter; one added later must be added to preset() too.
    per_job = [counter for counter in _counters(metrics) if _labels(counter) == ("type", "queue")]
    assert len(per_job) == 7
    for counter in per_job:
        (family,) = counter.describe()
        for job_type in ("demo_job", "noop"):
            labels = {"type": job_type, "queue": "default"}
            value = metrics.registry.get_sample_value(f"{family.name}_total", labels)
            assert value == 0.0, f"{family.name} {labels}"


def test_preset_keeps_counts_and_adds_only_what_it_is_given() -> None:
    metrics = WorkerMetrics(concurrency=1, registry=CollectorRegistry())
    metrics.jobs_failed.labels("demo_job", "default").inc()
    metrics.preset(["demo_job"], ["default", "emails"])
    text = expose(metrics.registry).decode()
    assert 'orchestrix_jobs_failed_total{queue="default",type="demo_job"} 1.0' in text
    assert 'orchestrix_jobs_failed_total{queue="emails",type="demo_job"} 0.0' in text
    assert 'type="noop"' not in text


def test_a_fresh_scheduler_exports_its_per_queue_counters_at_zero() -> None:
    metrics = SchedulerMetrics(CollectorRegistry())
    metrics.preset(("default",))
    text = expose(metrics.registry).decode()
    for state in RESCUED_STATES:
        assert f'orchestrix_jobs_rescued_total{{queue="default",state="{state}"}} 0.0' in text
    for outcome in ("created", "missed", "overlapped"):
        assert f'orchestrix_schedule_ticks_total{{outcome="{outcome}"}} 0.0' in text
    for pruned in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert f'orchestrix_jobs_pruned_total{{state="{pruned}"}} 0.0' in text
    # A counter added later must be exported at zero too.
    assert len(_counters(metrics)) == 5
