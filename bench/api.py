"""Phase 4, the API alone: how fast it creates jobs, one by one and in bulk.

Only the API runs (no scheduler): jobs stay PENDING, so this measures creation.

- single: ``api_clients`` (50) closed-loop clients POST ``{"type": "noop"}`` to
  ``/api/v1/jobs`` for ``api_duration_s`` (10 s) after a warm-up.
- bulk: ``POST /api/v1/jobs/batch`` with ``{"jobs": [...]}`` of ``bulk_size``
  (1,000) jobs from ``bulk_clients`` (4) clients. An API without that endpoint
  answers 404 (or 405, the method of ``/api/v1/jobs/{id}``); the result is then
  "n/a" and the run goes on.

With ``--api-auth`` the API runs with API_AUTH=on and every request carries one
admin key without limits (made in the phase's database), so that the figures,
set beside a run without it, give the cost of checking keys: the issue asks for
at most 5 % less.
"""

from __future__ import annotations

from typing import Any

import orjson

from bench.context import Context
from bench.infra import CpuMeter
from bench.load import JSON, NOOP_BODY, ClosedLoopResult, closed_loop, session, summary_ms

BULK_PATH = "/api/v1/jobs/batch"


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


async def run_phase(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    async with ctx.database("api") as url, ctx.stack("api", "api", url) as stack:
        headers = None
        if o.api_auth:
            stack.env["API_AUTH"] = "on"
            headers = await _admin_key(url)
        await stack.ready(stack.start("api"))
        async with session(max(o.api_clients, o.bulk_clients), headers) as http:
            meter = CpuMeter(stack.roles(), ctx.servers.pids)
            single = await closed_loop(
                http,
                stack.api_url + "/api/v1/jobs",
                NOOP_BODY,
                clients=o.api_clients,
                duration_s=o.api_duration_s,
                warmup_s=o.api_warmup_s,
            )
            single_json = _closed_json(single, meter.stop())
            print(
                f"  API single creates, {o.api_clients} clients: {single.jobs_per_s:,.0f} jobs/s "
                f"({single.errors} errors; client used {single.client_cores:.2f} cores)",
                flush=True,
            )

            bulk_url = stack.api_url + BULK_PATH
            probe = orjson.dumps({"jobs": [{"type": "noop"}]})
            async with http.post(bulk_url, data=probe, headers=JSON) as response:
                status, text = response.status, await response.text()
            bulk: dict[str, Any]
            if status in (404, 405):
                bulk = {"available": False, "status": status, "jobs_per_s": None}
                print("  API bulk: n/a (no bulk endpoint)", flush=True)
            elif status != 201 or len(orjson.loads(text).get("jobs", [])) != 1:
                bulk = {"available": False, "status": status, "jobs_per_s": None}
                bulk["error"] = f"probe answered {status}: {text[:300]}"
                print(f"  API bulk: n/a (probe answered {status})", flush=True)
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
                bulk = {
                    "available": True,
                    "batch": o.bulk_size,
                    **_closed_json(result, meter.stop()),
                }
                print(
                    f"  API bulk, {o.bulk_clients} clients x {o.bulk_size} jobs: "
                    f"{result.jobs_per_s:,.0f} jobs/s ({result.errors} errors)",
                    flush=True,
                )
        stack.check_alive()
    return {"auth": "on" if o.api_auth else "off", "single": single_json, "bulk": bulk}
