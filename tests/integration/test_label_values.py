"""Clients cannot add Prometheus series: made-up job types and queues count as other.

10,000 jobs of 10,000 distinct types in 10,000 distinct queues go through the API;
the series of the API's /metrics and of a scheduler's queue metrics are the same
before and after, but for the ones labelled ``other``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import asyncpg
from orchestrix.db import workers
from orchestrix.labels import LabelFollower
from orchestrix.metrics import OTHER, KnownLabels, SchedulerMetrics, expose
from orchestrix.services.api.keys import METRICS
from orchestrix.services.scheduler.depth import DepthReporter
from prometheus_client import CollectorRegistry

from tests.conftest import Api

DISTINCT = 10_000
BATCH = 1000
# One sample line: name{labels} value. Only the name and labels make a series.
_SAMPLE = re.compile(r"^(?P<series>[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) ")


def series(text: str) -> set[str]:
    found = set()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            found.add(match["series"])
    return found


def labelled_other(one: str) -> bool:
    return f'type="{OTHER}"' in one or f'queue="{OTHER}"' in one


async def register_worker(pool: asyncpg.Pool, types: list[str], queues: list[str]) -> None:
    async with pool.acquire() as conn:
        await workers.register(
            conn,
            workers.Registration(
                id="01KWORKER0000000000000000A",
                hostname="test",
                pid=1,
                queues=queues,
                types=types,
                concurrency=1,
            ),
        )


async def activity(api: Api, jobs: list[dict[str, str]]) -> None:
    """Every route that counts by type and queue: single and batch creates, a
    workflow, a cancel; then the batches of ``jobs``."""
    first, *rest = jobs
    status, job, _ = await api.request("POST", "/api/v1/jobs", json=first)
    assert status == 201, job
    status, body, _ = await api.request("DELETE", f"/api/v1/jobs/{job['id']}")
    assert status == 200, body
    status, body, _ = await api.request(
        "POST", "/api/v1/workflows", json={"jobs": [{"key": "a", **rest[0]}]}
    )
    assert status == 201, body
    for start in range(0, len(rest), BATCH):
        status, body, _ = await api.request(
            "POST", "/api/v1/jobs/batch", json={"jobs": rest[start : start + BATCH]}
        )
        assert status == 201, body


async def test_the_api_labels_only_what_live_workers_serve(api: Api, pool: asyncpg.Pool) -> None:
    await register_worker(pool, ["demo_job"], ["emails"])
    await LabelFollower(pool, api.app[METRICS].known).run_once()
    known = [{"type": "demo_job", "queue": queue} for queue in ("emails", "default", "emails")]
    await activity(api, known)
    await api.request("GET", "/metrics")  # so that its own request is counted before
    _, text, _ = await api.request("GET", "/metrics")
    assert 'orchestrix_jobs_created_total{queue="emails",type="demo_job"} 2.0' in text
    assert 'orchestrix_jobs_cancelled_total{queue="emails",type="demo_job"} 1.0' in text
    before = series(text)

    made_up = [{"type": f"made.up:{i}", "queue": f"q-{i}"} for i in range(DISTINCT)]
    await activity(api, made_up)
    _, text, _ = await api.request("GET", "/metrics")
    after = series(text)
    added = after - before
    assert before <= after
    assert all(labelled_other(one) for one in added), sorted(added)[:5]
    assert added == {
        'orchestrix_jobs_created_total{queue="other",type="other"}',
        'orchestrix_jobs_created_created{queue="other",type="other"}',
        'orchestrix_jobs_cancelled_total{queue="other",type="other"}',
        'orchestrix_jobs_cancelled_created{queue="other",type="other"}',
    }
    # Every job: the single one, the workflow's (a second job of jobs[1]'s type), the batches.
    assert f'orchestrix_jobs_created_total{{queue="other",type="other"}} {DISTINCT + 1}.0' in text
    assert "made.up" not in text
    assert "q-1" not in text


async def test_a_scheduler_labels_only_known_queues(api: Api, pool: asyncpg.Pool) -> None:
    await register_worker(pool, ["demo_job"], ["emails"])
    metrics = SchedulerMetrics(CollectorRegistry(), KnownLabels(["reports"]))
    await LabelFollower(pool, metrics.known).run_once()
    metrics.preset(metrics.known.queues)
    depth = DepthReporter(pool, metrics)
    known = [{"type": "demo_job", "queue": q} for q in ("emails", "default", "reports", "x")]
    await activity(api, known)
    await depth.run_once(datetime.now(UTC))
    text = expose(metrics.registry).decode()
    for queue in ("emails", "default", "reports"):
        assert f'orchestrix_jobs_rescued_total{{queue="{queue}",state="RETRYING"}} 0.0' in text
    assert 'orchestrix_queue_depth{queue="reports"} 1.0' in text
    assert 'orchestrix_queue_depth{queue="other"} 1.0' in text  # "x": nobody serves it
    before = series(text)

    await activity(api, [{"type": f"t{i}", "queue": f"q{i}"} for i in range(DISTINCT)])
    await depth.run_once(datetime.now(UTC))
    text = expose(metrics.registry).decode()
    assert series(text) == before
    # The jobs of every queue not known, summed: "x", and all but the one cancelled.
    assert f'orchestrix_queue_depth{{queue="other"}} {1 + DISTINCT}.0' in text


async def test_a_new_workers_types_and_queues_become_known(pool: asyncpg.Pool) -> None:
    known = KnownLabels(["reports"])
    follower = LabelFollower(pool, known)
    await follower.run_once()
    assert known.job("send_email", "emails") == (OTHER, OTHER)
    assert known.job("send_email", "reports") == (OTHER, "reports")
    await register_worker(pool, ["send_email"], ["emails"])
    await follower.run_once()
    assert known.job("send_email", "emails") == ("send_email", "emails")
    assert known.job("send_email", "default") == ("send_email", "default")
    # Known values stay known after the worker is gone: their series must not vanish.
    await pool.execute("TRUNCATE workers")
    await follower.run_once()
    assert known.job("send_email", "emails") == ("send_email", "emails")
