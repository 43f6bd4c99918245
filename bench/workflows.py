"""Workflows: how fast a 1,000-job workflow is created, and how soon a fan-in's child
starts once its last parent has succeeded.

The API, a scheduler and ``workflow_workers`` (2) workers run. Each of
``workflow_rounds`` (5) rounds POSTs one workflow of 999 no-op parents and one
child that depends on all of them, times the request (client side, the whole
POST, from sending the encoded body to the last byte of the answer), and waits
for the child to succeed. The release time is the child's
``started_at`` minus the latest ``completed_at`` of its parents: the success
that released it, its NOTIFY, the wake-up and the claim.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import orjson

from bench.context import Context
from bench.infra import BenchError
from bench.load import JSON, session, summary_ms

PARENTS = 999


def _body(round_: int) -> dict[str, Any]:
    parents = [{"key": f"p{i}", "type": "noop"} for i in range(PARENTS)]
    child = {"key": "child", "type": "noop", "depends_on": [p["key"] for p in parents]}
    return {"name": f"fan-in-{round_}", "jobs": [*parents, child]}


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    creates: list[float] = []
    releases: list[float] = []
    async with ctx.database("workflows") as url, ctx.stack("workflows", "workflows", url) as stack:
        started = [stack.start("api"), stack.start("scheduler")]
        started += [stack.start("worker") for _ in range(o.workflow_workers)]
        await stack.ready(*started)
        conn = await asyncpg.connect(url)
        try:
            async with session(2) as http:
                for round_ in range(o.workflow_rounds):
                    # Encoded before and decoded after the clock, which times the API
                    # (the client's stdlib JSON of 1,000 jobs each way is not its).
                    body = orjson.dumps(_body(round_))
                    sent = time.perf_counter()
                    url = stack.api_url + "/api/v1/workflows"
                    async with http.post(url, data=body, headers=JSON) as made:
                        answer = await made.read()
                    creates.append(time.perf_counter() - sent)
                    created = orjson.loads(answer)
                    if made.status != 201:
                        raise BenchError(f"workflows: create answered {made.status}: {created}")
                    child = next(j for j in created["jobs"] if j["workflow_key"] == "child")
                    path = f"{stack.api_url}/api/v1/jobs/{child['id']}?wait=60s"
                    async with http.get(path) as waited:
                        state = (await waited.json())["state"]
                    if state != "SUCCEEDED":
                        raise BenchError(f"workflows: the child is {state} after 60 s")
                    gap = await conn.fetchval(
                        """
                        SELECT extract(epoch FROM child.started_at - max(p.completed_at))
                        FROM jobs AS child
                        JOIN job_dependencies AS d ON d.job_id = child.id
                        JOIN jobs AS p ON p.id = d.parent_id
                        WHERE child.id = $1
                        GROUP BY child.started_at
                        """,
                        child["id"],
                    )
                    releases.append(float(gap))
                    stack.check_alive()
        finally:
            await conn.close()
    create, release = summary_ms(creates), summary_ms(releases)
    print(
        f"  workflow of {PARENTS + 1} jobs created in {create['p50']:.0f} ms (p50, max "
        f"{create['max']:.0f}); fan-in child started {release['p50']:.0f} ms (p50) after "
        "its last parent's success",
        flush=True,
    )
    return {
        "jobs": PARENTS + 1,
        "rounds": o.workflow_rounds,
        "create_ms": create,
        "release_ms": release,
        "create_ms_each": [round(s * 1000, 1) for s in creates],
        "release_ms_each": [round(s * 1000, 1) for s in releases],
    }
