"""Jobs created over REST run on real scheduler and worker processes, through NATS."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import Servers
from tests.e2e.harness import Service, System, read_executions, until

pytestmark = pytest.mark.timeout(120)


@dataclass
class Running:
    system: System
    api: Service
    scheduler: Service
    worker: Service
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api.port}"

    async def create(self, **fields: Any) -> dict[str, Any]:
        async with self.http.post(f"{self.url}/api/v1/jobs", json=fields) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 201, body
            return body

    async def get(self, job_id: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/api/v1/jobs/{job_id}") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def settled(self, job_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Wait for the job to reach a terminal state, read over the API."""

        async def terminal() -> dict[str, Any] | None:
            job = await self.get(job_id)
            return job if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

        logs = lambda: "\n".join(s.log()[-3000:] for s in (self.scheduler, self.worker))  # noqa: E731
        job: dict[str, Any] = await until(terminal, timeout_s, f"job {job_id} to finish", logs)
        return job


@pytest.fixture(scope="module")
async def running(
    database: str, servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    system = System(database, servers.nats_url, tmp_path_factory.mktemp("pipeline"))
    services = [system.start(role) for role in ("api", "scheduler", "worker")]
    try:
        for service in services:
            await system.ready(service)
        async with aiohttp.ClientSession() as http:
            yield Running(system, services[0], services[1], services[2], http)
    finally:
        system.stop_all()


async def most_running(database: str, which: str, *, queue: str) -> int:
    """The most jobs matching ``which`` RUNNING at once, sampled every 10 ms until
    every job of ``queue`` has SUCCEEDED (30 s at most)."""
    conn = await asyncpg.connect(database)
    try:
        most = 0
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            count = f"SELECT count(*) FROM jobs WHERE {which} AND state = 'RUNNING'"
            most = max(most, await conn.fetchval(count))
            left = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND state <> 'SUCCEEDED'", queue
            )
            if left == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    return most


def executions_of(running: Running, job_id: str) -> list[int]:
    return [
        int(row["attempt"])
        for row in read_executions(running.system.executions)
        if row["id"] == job_id
    ]


async def test_created_over_rest_runs_and_succeeds_with_its_result(running: Running) -> None:
    created = await running.create(type="demo_job", payload={"message": "hello world"})
    job = await running.settled(created["id"])
    assert job["state"] == "SUCCEEDED"
    assert job["result"] == {"message": "hello world"}
    assert job["attempt"] == 1
    assert job["errors"] == []
    assert job["last_error"] is None
    started = datetime.fromisoformat(job["started_at"])
    assert datetime.fromisoformat(job["created_at"]) <= started
    assert started <= datetime.fromisoformat(job["completed_at"])


async def test_plain_function_executor_runs_too(running: Running) -> None:
    created = await running.create(type="record_sync", payload={"sleep_ms": 10})
    job = await running.settled(created["id"])
    assert job["state"] == "SUCCEEDED"
    assert executions_of(running, created["id"]) == [1]


async def test_retryable_failure_retries_with_backoff_then_fails(running: Running) -> None:
    created = await running.create(type="demo_job", payload={"fail": "retryable"}, max_attempts=3)
    job = await running.settled(created["id"])
    assert job["state"] == "FAILED"
    assert job["attempt"] == 3
    assert [e["attempt"] for e in job["errors"]] == [1, 2, 3]
    assert job["last_error"] == "DemoFailure: demo_job was asked to fail (attempt 3)"
    # RETRY_BASE_DELAY is 200ms in these systems: attempt n waits at least
    # half of 0.2 * 2**(n-1) after attempt n failed.
    failed_at = [datetime.fromisoformat(e["at"]) for e in job["errors"]]
    for n, (before, after) in enumerate(itertools.pairwise(failed_at), start=1):
        assert after - before >= timedelta(seconds=0.5 * 0.2 * 2 ** (n - 1))


async def test_a_retrying_job_is_visible_as_retrying(running: Running) -> None:
    created = await running.create(type="demo_job", payload={"fail": "retryable"}, max_attempts=2)

    async def retrying() -> bool:
        state: str = (await running.get(created["id"]))["state"]
        return state == "RETRYING"

    await until(retrying, 10, "the job to be RETRYING", every_s=0.01)
    assert (await running.settled(created["id"]))["state"] == "FAILED"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {"type": "demo_job", "payload": {"fail": "permanent"}},
            "PermanentError: demo_job was asked to fail permanently",
        ),
        (
            {"type": "demo_job", "payload": {"sleep_ms": "soon"}},
            "InvalidPayload: sleep_ms must be a number of milliseconds",
        ),
    ],
)
async def test_permanent_failures_fail_after_one_attempt(
    running: Running, fields: dict[str, Any], error: str
) -> None:
    created = await running.create(max_attempts=5, **fields)
    job = await running.settled(created["id"])
    assert job["state"] == "FAILED"
    assert job["attempt"] == 1
    assert job["last_error"] == error
    assert len(job["errors"]) == 1


async def test_a_job_no_worker_can_run_waits_and_is_counted(running: Running) -> None:
    async def waiting() -> dict[str, Any]:
        async with running.http.get(f"{running.url}/api/v1/stats") as response:
            stats: dict[str, Any] = await response.json()
        assert stats["workers"] >= 1
        return dict(stats["waiting_for_executor"])

    before = await waiting()
    created = [await running.create(type="nobody_handles_this", max_attempts=5) for _ in range(3)]
    known = await running.create(type="demo_job")
    await running.settled(known["id"])  # a worker claimed past the unknown ones
    after = await waiting()
    # Other tests of the run leave jobs of many one-off types (the fuzz test's),
    # so only the total is this test's to check; test_api checks the types named.
    assert after["total"] == before["total"] + 3
    for job in created:
        job = await running.get(job["id"])
        assert (job["state"], job["attempt"]) == ("PENDING", 0)


async def test_the_scheduler_folds_the_job_counts(running: Running, database: str) -> None:
    """The counts /api/v1/stats reads: the leading scheduler folds the deltas the
    jobs' changes appended (every second), and what it folded matches the jobs."""
    created = [await running.create(type="demo_job") for _ in range(3)]
    for job in created:
        await running.settled(job["id"])
    conn = await asyncpg.connect(database)
    try:

        async def folded() -> bool:
            async with conn.transaction(isolation="repeatable_read"):
                if await conn.fetchval("SELECT count(*) FROM job_count_deltas"):
                    return False
                counts = await conn.fetch(
                    "SELECT queue, type, state, n FROM job_counts ORDER BY 1, 2, 3"
                )
                jobs = await conn.fetch(
                    "SELECT queue, type, state, count(*) AS n FROM jobs GROUP BY 1, 2, 3"
                    " ORDER BY 1, 2, 3"
                )
                return [tuple(r) for r in counts] == [tuple(r) for r in jobs]

        await until(
            folded, 15, "the deltas folded into job_counts", lambda: running.scheduler.log()[-3000:]
        )
    finally:
        await conn.close()
    async with running.http.get(f"{running.url}/api/v1/stats") as response:
        stats = await response.json()
    assert stats["jobs"]["SUCCEEDED"] >= 3


async def test_a_timeout_is_a_retryable_failure(running: Running) -> None:
    created = await running.create(
        type="demo_job", payload={"sleep_ms": 5000}, timeout_seconds=1, max_attempts=2
    )
    job = await running.settled(created["id"], timeout_s=30)
    assert job["state"] == "FAILED"
    assert job["attempt"] == 2
    assert job["last_error"] == "JobTimeout: the attempt ran longer than 1 s"


async def test_cancelled_before_start_never_runs(running: Running) -> None:
    later = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    created = await running.create(type="record", run_at=later)
    async with running.http.delete(f"{running.url}/api/v1/jobs/{created['id']}") as response:
        assert response.status == 200
        assert (await response.json())["state"] == "CANCELLED"
    # Past its run_at and a few polls more, it still has not run.
    control = await running.create(type="record", run_at=later)
    assert (await running.settled(control["id"]))["state"] == "SUCCEEDED"
    job = await running.get(created["id"])
    assert job["state"] == "CANCELLED"
    assert job["started_at"] is None
    assert executions_of(running, created["id"]) == []


async def test_ready_reports_both_dependencies(running: Running) -> None:
    for service in (running.api, running.scheduler, running.worker):
        async with running.http.get(f"http://127.0.0.1:{service.port}/ready") as response:
            assert response.status == 200
            assert (await response.json())["checks"] == {"postgres": "ok", "nats": "ok"}


async def test_metrics_exist_at_zero_before_the_first_job(running: Running) -> None:
    # No test here runs a noop job, nor loses a worker: these stay at 0 all along.
    async with running.http.get(f"http://127.0.0.1:{running.worker.port}/metrics") as response:
        text = await response.text()
    counters = (
        "claimed",
        "succeeded",
        "failed",
        "retried",
        "handed_back",
        "cancelled_while_running",
    )
    for counter in counters:
        assert f'orchestrix_jobs_{counter}_total{{queue="default",type="noop"}} 0.0' in text
    async with running.http.get(f"http://127.0.0.1:{running.scheduler.port}/metrics") as response:
        text = await response.text()
    assert 'orchestrix_jobs_rescued_total{queue="default",state="FAILED"} 0.0' in text
    # Exported from the start (its value is not this test's: the database is shared).
    assert "orchestrix_workers_lost_total " in text


async def test_metrics_count_outcomes_by_type(running: Running) -> None:
    created = await running.create(type="demo_job", queue="metrics_q")
    await running.settled(created["id"])
    async with running.http.get(f"http://127.0.0.1:{running.worker.port}/metrics") as response:
        text = await response.text()
    # demo_job is one of the worker's executors: a known label value. metrics_q is a
    # queue the client chose that no setting names (the worker takes every queue):
    # it is counted as "other", so that clients cannot grow the series.
    assert 'orchestrix_jobs_succeeded_total{queue="other",type="demo_job"} 1.0' in text
    assert 'orchestrix_job_duration_seconds_count{outcome="success",queue="other"' in text
    assert "metrics_q" not in text
    assert "orchestrix_job_start_latency_seconds_bucket" in text
    assert "orchestrix_worker_slots 100.0" in text  # WORKER_CONCURRENCY's default
    assert 'orchestrix_jobs_claimed_total{queue="other",type="demo_job"} 1.0' in text
    async with running.http.get(f"http://127.0.0.1:{running.scheduler.port}/metrics") as response:
        text = await response.text()
    assert "orchestrix_queue_depth" in text


async def test_a_workflow_runs_in_order_and_each_job_reads_its_parents(running: Running) -> None:
    """a and b, then c (their sum plus its own), then d: created at once over REST."""
    jobs = [
        {"key": "a", "type": "add_parents", "payload": {"n": 1}},
        {"key": "b", "type": "add_parents", "payload": {"n": 2}},
        {"key": "c", "type": "add_parents", "payload": {"n": 10}, "depends_on": ["a", "b"]},
        {"key": "d", "type": "add_parents", "payload": {"n": 100}, "depends_on": ["c"]},
    ]
    async with running.http.post(
        f"{running.url}/api/v1/workflows", json={"name": "sums", "jobs": jobs}
    ) as response:
        created = await response.json()
        assert response.status == 201, created
    by_key = {job["workflow_key"]: job for job in created["jobs"]}
    assert [by_key[k]["state"] for k in "abcd"] == ["PENDING", "PENDING", "WAITING", "WAITING"]
    last = await running.settled(by_key["d"]["id"])
    assert (last["state"], last["result"]) == ("SUCCEEDED", {"total": 113})
    async with running.http.get(f"{running.url}/api/v1/workflows/{created['id']}") as response:
        workflow = await response.json()
    assert workflow["state"] == "SUCCEEDED"
    finished = {job["workflow_key"]: job for job in workflow["jobs"]}
    assert finished["c"]["started_at"] >= max(
        finished["a"]["completed_at"], finished["b"]["completed_at"]
    )


async def test_a_concurrency_keys_limit_holds_on_real_workers(
    running: Running, database: str
) -> None:
    """30 jobs of one key, limit 3 on their queue: never more than 3 run at once, and
    a job of another key starts while that key's backlog waits."""
    async with running.http.patch(
        f"{running.url}/api/v1/queues/keyed", json={"key_limit": 3}
    ) as response:
        assert response.status == 200, await response.text()
    busy = [
        await running.create(
            type="record", queue="keyed", concurrency_key="busy", payload={"sleep_ms": 150}
        )
        for _ in range(30)
    ]
    other = await running.create(
        type="record", queue="keyed", concurrency_key="other", payload={"sleep_ms": 10}
    )
    most = await most_running(database, "concurrency_key = 'busy'", queue="keyed")
    assert most == 3
    finished = [await running.get(job["id"]) for job in busy]
    assert {job["state"] for job in finished} == {"SUCCEEDED"}
    last_busy_start = max(job["started_at"] for job in finished)
    assert (await running.get(other["id"]))["started_at"] < last_busy_start


async def test_a_rate_limit_holds_on_real_workers(running: Running) -> None:
    """40 jobs under 20 starts/s with a burst of 5: the starts in any span of t
    seconds are at most 5 + 20 t (one more for the clocks' rounding), and all run."""
    async with running.http.post(
        f"{running.url}/api/v1/rate-limits",
        json={"name": "e2e-rate", "per_second": 20, "burst": 5},
    ) as response:
        assert response.status == 201, await response.text()
    made = [
        await running.create(type="record", rate_limit="e2e-rate", payload={"sleep_ms": 1})
        for _ in range(40)
    ]
    finished = [await running.settled(job["id"]) for job in made]
    assert {job["state"] for job in finished} == {"SUCCEEDED"}
    starts = sorted(datetime.fromisoformat(job["started_at"]) for job in finished)
    for i, j in itertools.combinations(range(len(starts)), 2):
        span = (starts[j] - starts[i]).total_seconds()
        assert j - i + 1 <= 5 + 20 * span + 1, (i, j, span)
    span = (starts[-1] - starts[0]).total_seconds()
    assert span >= (40 - 5 - 1) / 20
    # Held-back jobs are looked for again within LIMITED_LOOK_S, not at the next
    # poll (1 s: 5 starts a poll would take 7 s); 1.75 s is the rate's own pace.
    assert span < 5, span


async def test_a_queues_running_limit_holds_on_real_workers(
    running: Running, database: str
) -> None:
    async with running.http.patch(
        f"{running.url}/api/v1/queues/narrow", json={"running_limit": 2}
    ) as response:
        assert response.status == 200, await response.text()
    made = [
        await running.create(type="record", queue="narrow", payload={"sleep_ms": 100})
        for _ in range(12)
    ]
    assert await most_running(database, "queue = 'narrow'", queue="narrow") == 2
    assert {(await running.get(job["id"]))["state"] for job in made} == {"SUCCEEDED"}
