"""Phase 4, the API alone: how fast it creates jobs, one by one and in bulk,
with authentication off and on.

Only the API runs (no scheduler): jobs stay PENDING, so this measures creation.
Two API processes share the phase's database: one with API_AUTH=off, one with
API_AUTH=on, whose clients send one admin key without limits (made in the
phase's database). Each round loads one of them alone, in the order off, on,
on, off, ... (``api_rounds`` (2) of each), so a machine that drifts over the
phase weighs on both alike; each one's best round counts. Each closed-loop round
begins on an empty, checkpointed jobs table, so every round meets the same table
(one adds about 550,000 jobs, most from the batches, and autovacuum then works on
them during the next). On each:

- single: ``api_clients`` (50) closed-loop clients POST ``{"type": "noop"}`` to
  ``/api/v1/jobs`` for ``api_duration_s`` (10 s) after a warm-up.
- bulk: ``POST /api/v1/jobs/batch`` with ``{"jobs": [...]}`` of ``bulk_size``
  (1,000) jobs from ``bulk_clients`` (4) clients. An API without that endpoint
  answers 404 (or 405, the method of ``/api/v1/jobs/{id}``); the result is then
  "n/a" and the run goes on.

The API figures are the ones with authentication off; ``auth_ratio`` is on / off
for each (issue 11 allows 5 % less with it on).

The rounds of one API spread by more than 5 % on a shared machine (and so does
the API's CPU per job under them: the more creates arrive together, the more
share one INSERT), so the phase also measures the API's CPU per job at a fixed
load (``fixed_rate``): ``api_fixed_rate`` (1,000) single creates a second, then
``api_fixed_batches`` (5) batch requests of ``bulk_size`` jobs a second, each
for ``api_fixed_s`` (6) seconds after a second's warm-up, ``api_fixed_rounds``
(3) on each API in the same off, on, on, off order; the medians of each, on
against off, are what authentication costs a job. And it times the auth path itself
(``auth_path``): in this process, on the phase's database, the API's
``Authenticator`` checks a key from its cache, its scope and its request budget
and charges one job, as for each single create, ``AUTH_PATH_CALLS`` times, with
a key whose limits are on (they are by default) but never reached. Its CPU time
per call, against the API's CPU per single create with auth off (the median of
the rounds), is what authentication adds to a create.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import orjson
import psutil

from bench.context import Context
from bench.infra import BenchError, CpuMeter, fresh_jobs
from bench.load import (
    JSON,
    NOOP_BODY,
    ClosedLoopResult,
    closed_loop,
    open_loop,
    session,
    summary_ms,
)

BULK_PATH = "/api/v1/jobs/batch"
AUTH_PATH_CALLS = 20_000


def _closed_json(result: ClosedLoopResult, cpu: dict[str, float]) -> dict[str, Any]:
    return {
        "clients": result.clients,
        "duration_s": result.duration_s,
        "jobs": result.jobs,
        "requests": result.requests,
        "errors": result.errors,
        "error_samples": result.error_samples,
        "jobs_per_s": round(result.jobs_per_s, 1),
        "request_ms": summary_ms(result.latencies_s) if result.latencies_s else None,
        "client_cores": result.client_cores,
        "cpu_s": cpu,
    }


async def _admin_key(db_url: str) -> dict[str, str]:
    """An Authorization header with a new admin key without limits."""
    import asyncpg
    from orchestrix.db import api_keys

    conn = await asyncpg.connect(db_url)
    try:
        unlimited = api_keys.KeyLimits(requests_per_s=0, jobs_per_s=0)
        _, token = await api_keys.create(conn, "bench", ["admin"], limits=unlimited)
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {token}"}


async def _auth_path(db_url: str, calls: int) -> dict[str, Any]:
    """CPU time of the API's auth path for one create, timed here (see the module)."""
    import asyncpg
    from aiohttp.test_utils import make_mocked_request
    from orchestrix import apikeys
    from orchestrix.db import api_keys
    from orchestrix.services.api.auth import Authenticator
    from orchestrix.settings import AuthSettings

    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    try:
        never = api_keys.KeyLimits(requests_per_s=1e9, jobs_per_s=1e9)
        _, token = await api_keys.create(pool, "bench-auth-path", ["admin"], limits=never)
        authenticator = Authenticator(pool, AuthSettings())
        request = make_mocked_request(
            "POST", "/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}
        )
        await authenticator.verify(request)  # the key's first load; cached from here on
        started = time.process_time()
        for _ in range(calls):
            caller = await authenticator.verify(request)
            assert apikeys.allows(caller.scopes, "jobs:write")
            authenticator.charge_request(caller)
            authenticator.charge_jobs(caller, 1)
        per_call_us = (time.process_time() - started) / calls * 1e6
    finally:
        await pool.close()
    return {"calls": calls, "cpu_us": round(per_call_us, 2)}


def _order(rounds: int) -> list[str]:
    """off, on, on, off, off, on, ...: ``rounds`` of each, in mirrored pairs."""
    pairs = [("off", "on") if i % 2 == 0 else ("on", "off") for i in range(rounds)]
    return [label for pair in pairs for label in pair]


async def _bulk_available(http: Any, bulk_url: str) -> dict[str, Any] | None:
    """None when the API creates batches; else why not, as the result to report."""
    probe = orjson.dumps({"jobs": [{"type": "noop"}]})
    async with http.post(bulk_url, data=probe, headers=JSON) as response:
        status, text = response.status, await response.text()
    if status in (404, 405):
        return {"available": False, "status": status, "jobs_per_s": None}
    if status != 201 or len(orjson.loads(text).get("jobs", [])) != 1:
        return {
            "available": False,
            "status": status,
            "jobs_per_s": None,
            "error": f"probe answered {status}: {text[:300]}",
        }
    return None


async def _round(
    ctx: Context, stack: Any, api_url: str, headers: dict[str, str] | None, label: str
) -> dict[str, Any]:
    o = ctx.options
    async with session(max(o.api_clients, o.bulk_clients), headers) as http:
        meter = CpuMeter(stack.roles(), ctx.servers.pids)
        single = await closed_loop(
            http,
            api_url + "/api/v1/jobs",
            NOOP_BODY,
            clients=o.api_clients,
            duration_s=o.api_duration_s,
            warmup_s=o.api_warmup_s,
        )
        single_json = _closed_json(single, meter.stop())
        print(
            f"  API auth {label}, single creates, {o.api_clients} clients: "
            f"{single.jobs_per_s:,.0f} jobs/s ({single.errors} errors; "
            f"client used {single.client_cores:.2f} cores)",
            flush=True,
        )
        bulk_url = api_url + BULK_PATH
        bulk = await _bulk_available(http, bulk_url)
        if bulk is not None:
            print(f"  API auth {label}, bulk: n/a (probe answered {bulk['status']})", flush=True)
        else:
            body = orjson.dumps({"jobs": [{"type": "noop"}] * o.bulk_size})
            meter = CpuMeter(stack.roles(), ctx.servers.pids)
            result = await closed_loop(
                http,
                bulk_url,
                body,
                clients=o.bulk_clients,
                duration_s=o.api_duration_s,
                warmup_s=o.api_warmup_s,
                jobs_per_request=o.bulk_size,
            )
            bulk = {"available": True, "batch": o.bulk_size, **_closed_json(result, meter.stop())}
            print(
                f"  API auth {label}, bulk, {o.bulk_clients} clients x {o.bulk_size} jobs: "
                f"{result.jobs_per_s:,.0f} jobs/s ({result.errors} errors)",
                flush=True,
            )
    return {"single": single_json, "bulk": bulk}


async def _fixed_rate(
    ctx: Context, apis: dict[str, Any], headers: dict[str, dict[str, str] | None]
) -> dict[str, Any]:
    """The API's CPU per job at a fixed load, auth off and on (see the module)."""
    o = ctx.options
    batch = orjson.dumps({"jobs": [{"type": "noop"}] * o.bulk_size})
    loads = (
        ("single", "/api/v1/jobs", NOOP_BODY, o.api_fixed_rate, 1),
        ("bulk", BULK_PATH, batch, o.api_fixed_batches, o.bulk_size),
    )
    out: dict[str, Any] = {}
    for kind, path, body, rate, jobs_per_request in loads:
        cpu_us: dict[str, list[float]] = {"off": [], "on": []}
        for label in _order(o.api_fixed_rounds):
            url = f"http://127.0.0.1:{apis[label].port}{path}"
            process = psutil.Process(apis[label].pid)
            async with session(200, headers[label]) as http:
                await open_loop(http, url, rate, 1.0, body=body)  # warm-up
                before = process.cpu_times()
                result = await open_loop(http, url, rate, o.api_fixed_s, body=body)
                after = process.cpu_times()
            if result.errors:
                raise BenchError(f"api fixed rate, auth {label}: {result.error_samples[:3]}")
            used = (after.user + after.system) - (before.user + before.system)
            cpu_us[label].append(round(used / (result.created * jobs_per_request) * 1e6, 1))
        off, on = median(cpu_us["off"]), median(cpu_us["on"])
        out[kind] = {
            "rate": rate,
            "jobs_per_request": jobs_per_request,
            "cpu_us_off": off,
            "cpu_us_on": on,
            "ratio": round(on / off, 3) if off else None,
            "each": cpu_us,
        }
        print(
            f"  API at a fixed {rate:g} requests/s of {jobs_per_request} job(s): CPU per job"
            f" {on:.1f} us with auth on vs {off:.1f} off (medians of {cpu_us})",
            flush=True,
        )
    return out


def _best(runs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return max((run[kind] for run in runs), key=lambda r: float(r["jobs_per_s"] or 0.0))


def _ratio(on: float | None, off: float | None) -> float | None:
    return round(on / off, 3) if on and off else None


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    async with ctx.database("api") as url, ctx.stack("api", "api", url) as stack:
        apis = {"off": stack.start("api"), "on": stack.start("api", {"API_AUTH": "on"})}
        headers = {"off": None, "on": await _admin_key(url)}
        await stack.ready(*apis.values())
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for label in _order(o.api_rounds):
            await fresh_jobs(url)
            api_url = f"http://127.0.0.1:{apis[label].port}"
            runs[label].append(await _round(ctx, stack, api_url, headers[label], label))
            stack.check_alive()
        fixed_rate = await _fixed_rate(ctx, apis, headers)
        stack.check_alive()
        auth_path = await _auth_path(url, AUTH_PATH_CALLS)
    # The API's CPU per single create with auth off, the median of its rounds.
    api_us = median(
        run["single"]["cpu_s"].get("api", 0.0) / max(1, run["single"]["jobs"]) * 1e6
        for run in runs["off"]
    )
    auth_path["api_cpu_us_per_create"] = round(api_us, 1)
    auth_path["share"] = round(auth_path["cpu_us"] / api_us, 4) if api_us else None
    print(
        f"  API auth path, timed in-process: {auth_path['cpu_us']:.1f} us of CPU a create,"
        f" against {api_us:.0f} us of the API's CPU a create with auth off"
        + (f" ({auth_path['share']:.1%})" if auth_path["share"] is not None else ""),
        flush=True,
    )
    best = {
        label: {kind: _best(done, kind) for kind in ("single", "bulk")}
        for label, done in runs.items()
    }
    ratio = {
        kind: _ratio(best["on"][kind]["jobs_per_s"], best["off"][kind]["jobs_per_s"])
        for kind in ("single", "bulk")
    }
    return {
        **best["off"],
        "rounds": o.api_rounds,
        "auth_on": best["on"],
        "auth_ratio": ratio,
        "auth_path": auth_path,
        "fixed_rate": fixed_rate,
        "each_round": runs,
    }
