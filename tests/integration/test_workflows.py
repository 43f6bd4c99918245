"""Workflows on a real database and over real HTTP: the graph checked, created at once,
children released by their parents' successes, failures cancelling descendants, a
retry resuming, fan-out and fan-in of a thousand."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from orchestrix import ids
from orchestrix.db import events, workflows
from orchestrix.db import jobs as db
from orchestrix.models import Job
from orchestrix.services.api.workflows import WORKFLOW_JOBS_MAX
from orchestrix.services.scheduler.settler import Settler
from orchestrix.states import JobState

from tests.conftest import Api
from tests.e2e.harness import until

S = JobState
WORKER = "w1"


async def create(api: Api, jobs: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    status, body, _ = await api.request("POST", "/api/v1/workflows", json={"jobs": jobs, **fields})
    assert status == 201, body
    return dict(body)


def step(key: str, *parents: str, **fields: Any) -> dict[str, Any]:
    return {"key": key, "type": "t", "depends_on": list(parents), **fields}


async def states(pool: asyncpg.Pool, workflow_id: str) -> dict[str, S]:
    workflow = await workflows.get(pool, workflow_id)
    assert workflow is not None
    return {job.workflow_key or "": job.state for job in workflow.jobs}


async def claim_all(pool: asyncpg.Pool) -> list[Job]:
    return await db.claim(pool, worker_id=WORKER, queues=None, types=["t"], limit=1000, lease_s=30)


async def succeed(pool: asyncpg.Pool, claimed: list[Job]) -> None:
    for start in range(0, len(claimed), 100):  # as a worker batches them
        batch = claimed[start : start + 100]
        outcomes = [(job.id, job.attempt, {"key": job.workflow_key}) for job in batch]
        assert all(await db.succeed_many(pool, outcomes, worker_id=WORKER))


async def sinks(pool: asyncpg.Pool, workflow_id: str) -> list[Job]:
    workflow = await workflows.get(pool, workflow_id)
    assert workflow is not None
    return [job for job in workflow.jobs if job.workflow_key == "sink"]


async def test_a_chain_runs_one_after_another(api: Api, pool: asyncpg.Pool) -> None:
    made = await create(api, [step("a"), step("b", "a"), step("c", "b")], name="chain")
    assert made["name"] == "chain"
    assert made["edges"] == [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]
    assert await states(pool, made["id"]) == {"a": S.PENDING, "b": S.WAITING, "c": S.WAITING}
    for key in "abc":
        [claimed] = await claim_all(pool)  # only the job whose parents are done
        assert claimed.workflow_key == key
        await succeed(pool, [claimed])
    assert set((await states(pool, made["id"])).values()) == {S.SUCCEEDED}
    status, body, _ = await api.request("GET", f"/api/v1/workflows/{made['id']}")
    assert (status, body["state"], body["counts"]) == (200, "SUCCEEDED", {"SUCCEEDED": 3})
    # b's release is its own event, written with a's success, by a's worker.
    b = next(job for job in body["jobs"] if job["workflow_key"] == "b")
    history = [(e.from_state, e.to_state, e.actor) for e in await events.for_job(pool, b["id"])]
    assert history[:2] == [(None, S.WAITING, None), (S.WAITING, S.PENDING, f"worker:{WORKER}")]
    # The parents' results, by key, as job.parents shows them.
    assert await workflows.parents(pool, b["id"]) == {"a": {"key": "a"}}


async def test_fan_out_and_fan_in_of_a_thousand(api: Api, pool: asyncpg.Pool) -> None:
    wide = WORKFLOW_JOBS_MAX - 1
    fan_out = await create(api, [step("root"), *(step(f"c{i}", "root") for i in range(wide))])
    [root] = await claim_all(pool)
    await succeed(pool, [root])
    children = await claim_all(pool)
    assert len(children) == wide  # all released by one success
    await succeed(pool, children)
    assert set((await states(pool, fan_out["id"])).values()) == {S.SUCCEEDED}

    sources = [step(f"p{i}") for i in range(wide)]
    fan_in = await create(api, [*sources, step("sink", *(p["key"] for p in sources))])
    parents = await claim_all(pool)
    assert len(parents) == wide
    await succeed(pool, parents[:-1])  # 998 of 999: the sink still waits for one
    [sink] = await sinks(pool, fan_in["id"])
    assert (sink.state, sink.waiting_for) == (S.WAITING, 1)
    await succeed(pool, parents[-1:])
    [claimed] = await claim_all(pool)
    assert claimed.id == sink.id
    assert len(await workflows.parents(pool, sink.id)) == wide


async def test_a_failure_cancels_every_descendant_and_a_retry_resumes(
    api: Api, pool: asyncpg.Pool
) -> None:
    # a -> {b, c} -> d -> e; b fails for good, c succeeds.
    made = await create(
        api, [step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"), step("e", "d")]
    )
    [a] = await claim_all(pool)
    await succeed(pool, [a])
    b, c = sorted(await claim_all(pool), key=lambda job: job.workflow_key or "")
    await succeed(pool, [c])
    assert await db.fail(pool, b.id, b.attempt, "Boom: for good", worker_id=WORKER) is not None
    settler = Settler(pool)
    assert await settler.run_once() == (1, 2)
    assert await settler.run_once() == (0, 0)  # settled once
    assert await states(pool, made["id"]) == {
        "a": S.SUCCEEDED,
        "b": S.FAILED,
        "c": S.SUCCEEDED,
        "d": S.CANCELLED,
        "e": S.CANCELLED,
    }
    workflow = await workflows.get(pool, made["id"])
    assert workflow is not None
    assert workflow.state == "FAILED"
    d = next(job for job in workflow.jobs if job.workflow_key == "d")
    assert d.cancelled_by == b.id
    assert d.last_error == f"DependencyFailed: its ancestor b ({b.id}) ended FAILED"
    assert str((await events.for_job(pool, d.id))[-1].actor).startswith("settler:")

    # The operator retries b: it runs again, and d and e wait for it again; a and
    # c, which succeeded, do not run again.
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{b.id}/retry")
    assert (status, body["state"], body["attempt"]) == (200, "PENDING", 0)
    assert body["errors"][0]["error"] == "Boom: for good"  # its history stays
    assert await states(pool, made["id"]) == {
        "a": S.SUCCEEDED,
        "b": S.PENDING,
        "c": S.SUCCEEDED,
        "d": S.WAITING,
        "e": S.WAITING,
    }
    d_now = await db.get(pool, d.id)
    assert d_now is not None
    assert (d_now.waiting_for, d_now.cancelled_by, d_now.last_error) == (1, None, None)
    assert (await events.for_job(pool, d.id))[-1].to_state is S.WAITING
    for key in "bde":
        [claimed] = await claim_all(pool)
        assert claimed.workflow_key == key
        await succeed(pool, [claimed])
    assert set((await states(pool, made["id"])).values()) == {S.SUCCEEDED}


async def test_retrying_a_job_whose_parent_is_not_done_makes_it_wait(
    api: Api, pool: asyncpg.Pool
) -> None:
    made = await create(api, [step("a"), step("b", "a")])
    by_key = {job["workflow_key"]: job for job in made["jobs"]}
    status, _, _ = await api.request("DELETE", f"/api/v1/jobs/{by_key['b']['id']}")
    assert status == 200  # WAITING: cancelled at once
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{by_key['b']['id']}/retry")
    assert (status, body["state"], body["waiting_for"]) == (200, "WAITING", 1)
    status, body, _ = await api.request("POST", f"/api/v1/jobs/{by_key['a']['id']}/retry")
    assert status == 409  # PENDING: nothing to retry


async def test_delete_cancels_what_has_not_finished(api: Api, pool: asyncpg.Pool) -> None:
    made = await create(api, [step("a"), step("b"), step("c", "a"), step("d", "b")])
    a, _ = sorted(await claim_all(pool), key=lambda job: job.workflow_key or "")
    await succeed(pool, [a])  # a done, c released (PENDING), b running, d waiting
    status, body, _ = await api.request("DELETE", f"/api/v1/workflows/{made['id']}")
    assert (status, body) == (200, {"cancelled": 2, "cancel_requested": 1})
    assert await states(pool, made["id"]) == {
        "a": S.SUCCEEDED,
        "b": S.RUNNING,  # its worker is asked to stop
        "c": S.CANCELLED,
        "d": S.CANCELLED,
    }
    status, body, _ = await api.request("DELETE", f"/api/v1/workflows/{ids.new_id()}")
    assert status == 404


async def test_the_event_stream_filters_by_workflow(api: Api, pool: asyncpg.Pool) -> None:
    from orchestrix.db.events import START, EventFilter

    made = await create(api, [step("a"), step("b", "a")])
    await create(api, [step("x")])  # another workflow's

    async def both() -> list[events.Event]:
        # The feed shows a commit once every older transaction on the server has
        # ended: another database's may still run.
        read = await events.after(pool, START, limit=100, where=EventFilter(workflow_id=made["id"]))
        return read if len(read) >= 2 else []

    read = await until(both, 10, "the workflow's events in the feed")
    assert sorted((e.to_state, e.workflow_id) for e in read) == [
        (S.PENDING, made["id"]),
        (S.WAITING, made["id"]),
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"jobs": []}, "jobs must be an array of 1 to 1000 jobs"),
        ({"jobs": [step(f"j{i}") for i in range(1001)]}, "jobs must be an array of 1 to 1000"),
        ({"jobs": [step("a"), step("a")]}, "key 'a' is used by more than one job"),
        ({"jobs": [step("a", "a")]}, "job 'a' depends on itself"),
        ({"jobs": [step("a", "zz")]}, "job 'a' depends on 'zz', which is no job's key"),
        (
            {"jobs": [step("a", "c"), step("b", "a"), step("c", "b"), step("d")]},
            "depends_on has a cycle: the jobs must form a DAG (on or after it: 'a', 'b', 'c')",
        ),
        ({"jobs": [{**step("a"), "idempotency_key": "k"}]}, "jobs[0]: idempotency_key is not"),
        ({"jobs": [{"type": "t"}]}, "jobs[0]: key is required"),
        ({"jobs": [{**step("a"), "key": "a b"}]}, "jobs[0]: key must be a string matching"),
        ({"jobs": [{**step("a"), "priority": 5000}]}, "jobs[0]: priority"),
        ({"jobs": [step("a")], "owner": "me"}, "unknown field(s): owner"),
        ({"jobs": [{"key": "a", "type": "t", "depends_on": "b"}]}, "depends_on must be an array"),
    ],
)
async def test_bad_workflows_are_400_and_nothing_is_written(
    api: Api, pool: asyncpg.Pool, body: dict[str, Any], problem: str
) -> None:
    status, answer, _ = await api.request("POST", "/api/v1/workflows", json=body)
    assert status == 400
    assert problem in answer["error"]
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert await pool.fetchval("SELECT count(*) FROM workflows") == 0


async def test_get_of_an_unknown_workflow_is_404(api: Api) -> None:
    status, body, _ = await api.request("GET", f"/api/v1/workflows/{ids.new_id()}")
    assert status == 404
    assert "not found" in body["error"]
