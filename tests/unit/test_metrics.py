"""Counters that dashboards and alerts query exist at 0 before their first event."""

from __future__ import annotations

from orchestrix.metrics import (
    MAX_LABEL_VALUES,
    OTHER,
    RESCUED_STATES,
    KnownLabels,
    SchedulerMetrics,
    WorkerMetrics,
    expose,
    http_method,
)
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


def test_only_known_types_and_queues_are_label_values() -> None:
    known = KnownLabels(["reports"])
    assert known.job("anything", "default") == (OTHER, "default")
    assert known.job("anything", "reports") == (OTHER, "reports")
    assert known.job("anything", "emails") == (OTHER, OTHER)
    known.learn(["send_email"], ["emails"])
    assert known.job("send_email", "emails") == ("send_email", "emails")
    assert known.queue("elsewhere") == OTHER


def test_known_values_are_capped_per_process() -> None:
    known = KnownLabels(max_values=3)
    known.learn([f"t{i}" for i in range(10)], [f"q{i}" for i in range(10)])
    assert known.types == {"t0", "t1", "t2"}
    assert known.queues == {"default", "q0", "q1"}
    assert known.job("t3", "q2") == (OTHER, OTHER)
    assert len(KnownLabels().types) == 0
    default = KnownLabels()
    default.learn([f"t{i}" for i in range(MAX_LABEL_VALUES + 50)], [])
    assert len(default.types) == MAX_LABEL_VALUES


def test_a_worker_labels_its_own_types_and_queues_and_the_rest_as_other() -> None:
    metrics = WorkerMetrics(concurrency=1, registry=CollectorRegistry())
    metrics.preset(["demo_job"], ["default"])
    metrics.jobs_failed.labels(*metrics.known.job("demo_job", "default")).inc()
    metrics.jobs_failed.labels(*metrics.known.job("made_up", "nowhere")).inc()
    text = expose(metrics.registry).decode()
    assert 'orchestrix_jobs_failed_total{queue="default",type="demo_job"} 1.0' in text
    assert 'orchestrix_jobs_failed_total{queue="other",type="other"} 1.0' in text
    assert "made_up" not in text
    assert "nowhere" not in text


def test_unknown_http_methods_are_other() -> None:
    assert http_method("GET") == "GET"
    assert http_method("BREW") == OTHER
