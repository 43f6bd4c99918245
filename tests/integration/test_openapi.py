"""The OpenAPI document: it lists every route, is valid OpenAPI, and real answers match it."""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from openapi_spec_validator import validate as validate_spec
from orchestrix import ids
from orchestrix.models import Job
from orchestrix.services.api import openapi
from orchestrix.services.api.app import build_app
from orchestrix.services.api.errors import ApiError
from orchestrix.services.api.parsing import (
    CREATE_FIELDS,
    DEFAULT_LIMIT,
    parse_list_query,
    parse_new_job,
)
from orchestrix.settings import ApiSettings, Settings

from tests.conftest import Api, free_port, served

JSON = {"Content-Type": "application/json"}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the application serves, HEAD left out."""
    operations = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if route.method != "HEAD":
            operations.add((route.method, resource.canonical))
    return operations


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


async def served_document(api: Api) -> dict[str, Any]:
    status, document, response = await api.request("GET", "/openapi.json")
    assert status == 200
    assert response.content_type == "application/json"
    assert isinstance(document, dict)
    return document


async def test_every_route_is_documented_and_every_documented_route_exists(api: Api) -> None:
    document = await served_document(api)
    served = app_operations(api.app)
    documented = documented_operations(document)
    assert served - documented == set(), "routes missing from the document"
    assert documented - served == set(), "documented routes the app does not serve"
    assert ("GET", "/openapi.json") in served


async def test_document_is_valid_openapi(api: Api, settings: Settings) -> None:
    document = await served_document(api)
    validate_spec(document)  # raises on an invalid document
    assert document == openapi.build_document(
        settings.api.max_body_bytes, settings.api.list_max_bytes, settings.auth
    )
    assert document["openapi"].startswith("3.")


def test_document_states_the_configured_body_limit() -> None:
    assert "at most 2048 bytes" in openapi.build_document(2048)["info"]["description"]
    default = openapi.build_document()["info"]["description"]
    assert f"at most {ApiSettings.max_body_bytes} bytes" in default
    assert "API_MAX_BODY_BYTES" in default


def test_job_schema_has_every_field_of_a_job() -> None:
    schema = openapi.job_schema()
    fields = [item.name for item in dataclasses.fields(Job)]
    assert list(schema["properties"]) == fields
    assert schema["required"] == fields
    nullable = {name for name, prop in schema["properties"].items() if prop.get("nullable")}
    assert nullable == {
        "idempotency_key",
        "last_error",
        "scheduled_at",
        "started_at",
        "completed_at",
        "cancel_requested_at",
        "worker_id",
        "schedule",
        "tick_at",
        "progress_at",
        "workflow_id",
        "workflow_key",
        "cancelled_by",
        "concurrency_key",
        "rate_limit",
        "created_by_key",
        "cancelled_by_key",
    }


def test_id_pattern_is_what_ids_accepts() -> None:
    pattern = re.compile(openapi.ULID_PATTERN)
    for _ in range(100):
        assert pattern.fullmatch(ids.new_id())
    for other in (ids.new_id().lower(), "8" + ids.new_id()[1:], ids.new_id()[:-1], ""):
        assert not pattern.fullmatch(other)
        assert not ids.is_valid(other)


def test_new_job_schema_lists_exactly_the_accepted_fields() -> None:
    schema = openapi.new_job_schema()
    assert set(schema["properties"]) == CREATE_FIELDS
    assert schema["required"] == ["type"]
    assert schema["additionalProperties"] is False


def new_job_bounds() -> list[tuple[str, int, int]]:
    properties = openapi.new_job_schema()["properties"]
    return [
        (name, prop["minimum"], prop["maximum"])
        for name, prop in properties.items()
        if prop.get("type") == "integer"
    ]


@pytest.mark.parametrize(("field", "low", "high"), new_job_bounds())
def test_documented_integer_ranges_are_the_enforced_ones(field: str, low: int, high: int) -> None:
    for accepted in (low, high):
        assert getattr(parse_new_job({"type": "t", field: accepted}), field) == accepted
    for refused in (low - 1, high + 1):
        with pytest.raises(ApiError) as refusal:
            parse_new_job({"type": "t", field: refused})
        assert refusal.value.status == 400


def test_documented_limit_range_is_the_enforced_one() -> None:
    (limit,) = [
        parameter["schema"]["anyOf"][0]
        for parameter in openapi.build_document()["paths"]["/api/v1/jobs"]["get"]["parameters"]
        if parameter["name"] == "limit"
    ]
    for accepted in (limit["minimum"], limit["maximum"]):
        assert parse_list_query({"limit": str(accepted)}).limit == accepted
    for refused in (limit["minimum"] - 1, limit["maximum"] + 1):
        with pytest.raises(ApiError):
            parse_list_query({"limit": str(refused)})


@pytest.mark.parametrize(
    ("field", "longest", "character"),
    [("type", 128, "t"), ("queue", 64, "q"), ("idempotency_key", 255, "é")],
)
def test_documented_string_lengths_are_the_enforced_ones(
    field: str, longest: int, character: str
) -> None:
    schema = openapi.new_job_schema()["properties"][field]
    validator = OAS30Validator(schema, format_checker=oas30_format_checker)
    body = {"type": "t"}
    assert validator.is_valid(character * longest)
    assert getattr(parse_new_job({**body, field: character * longest}), field)
    for refused in ("", character * (longest + 1)):
        assert not validator.is_valid(refused)
    # The validator uses Python's re.search, where "$" also matches before a final
    # newline; in the document's ECMA-262 dialect it does not, and neither does the API.
    for refused in ("", character * (longest + 1), character + "\n"):
        with pytest.raises(ApiError):
            parse_new_job({**body, field: refused})


@pytest.mark.parametrize("limit", ["+5", "5_0", "\u0665", " 5", "5 ", "1" * 5000])
def test_limit_takes_only_decimal_ascii_digits(limit: str) -> None:
    with pytest.raises(ApiError) as refusal:
        parse_list_query({"limit": limit})
    assert refusal.value.message == "limit must be an integer"


@pytest.mark.parametrize("query", [{"state": "fa\u0131led"}, {"type": "t\n"}, {"queue": "q\n"}])
def test_list_filters_refuse_what_the_document_refuses(query: dict[str, str]) -> None:
    with pytest.raises(ApiError):
        parse_list_query(query)


def test_empty_list_filters_mean_no_filter() -> None:
    query = parse_list_query(
        dict.fromkeys(("state", "type", "queue", "limit", "cursor", "include"), "")
    )
    where = query.where
    assert (where.state, where.type, where.queue, query.cursor) == (None, None, None, None)
    assert query.limit == DEFAULT_LIMIT
    assert query.include == frozenset()


@pytest.mark.parametrize(
    ("run_at", "stored"),
    [
        ("0001-01-01T00:00:00+01:00", "0001-01-02T00:00:00.000000Z"),
        ("9999-12-31T23:59:59-01:00", "9999-12-31T00:00:00.000000Z"),
        # The edges themselves, which asyncpg stores as -infinity / infinity.
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),
    ],
)
async def test_run_at_an_offset_moves_past_years_1_to_9999_is_clamped(
    api: Api, pool: asyncpg.Pool, run_at: str, stored: str
) -> None:
    # Valid RFC 3339 (the document says date-time), but not showable in UTC: the
    # nearest time that is stands in, rather than a 400 the schema cannot predict.
    status, body, _ = await api.request(
        "POST", "/api/v1/jobs", json={"type": "t", "run_at": run_at}
    )
    assert status == 201
    assert body["run_at"] == stored


class Responses:
    """Validates answers against the schema the document gives for their path, method and status."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: set[tuple[str, str, int]] = set()

    def schema_for(self, method: str, path: str, status: int, content_type: str) -> Any:
        operation = self.document["paths"][path][method.lower()]
        assert str(status) in operation["responses"], f"{method} {path} {status} not documented"
        content = operation["responses"][str(status)]["content"]
        assert content_type in content, f"{method} {path} {status}: {content_type} not documented"
        return content[content_type]["schema"]

    async def call(
        self, api: Api, method: str, url: str, path: str, status: int | set[int], **kwargs: Any
    ) -> Any:
        got, body, response = await api.request(method, url, **kwargs)
        assert got in (status if isinstance(status, set) else {status}), body
        schema = self.schema_for(method, path, got, response.content_type)
        # $refs point into the document's components: validate with them at hand.
        validator = OAS30Validator(
            {**schema, "components": self.document["components"]},
            format_checker=oas30_format_checker,
        )
        errors = [error.message for error in validator.iter_errors(body)]
        assert errors == [], f"{method} {url} -> {got}: {errors}"
        self.checked.add((method, path, got))
        return body


async def test_real_answers_match_the_document(api: Api, pool: asyncpg.Pool) -> None:
    responses = Responses(await served_document(api))
    jobs, one = "/api/v1/jobs", "/api/v1/jobs/{id}"
    sql = "'; DROP TABLE jobs; --"
    created = await responses.call(
        api,
        "POST",
        jobs,
        jobs,
        201,
        json={"type": "demo_job", "payload": {"q": sql, "ü": "漢字🙂"}, "idempotency_key": sql},
    )
    again = await responses.call(
        api, "POST", jobs, jobs, 200, json={"type": "demo_job", "idempotency_key": sql}
    )
    assert again == created
    url = f"{jobs}/{created['id']}"
    fetched = await responses.call(api, "GET", url, one, 200)
    assert fetched["payload"] == {"q": sql, "ü": "漢字🙂"}
    await pool.execute(
        """UPDATE jobs SET state = 'FAILED', attempt = 1, last_error = 'boom',
           completed_at = now(), scheduled_at = now(), started_at = now(),
           errors = jsonb_build_array(jsonb_build_object(
               'attempt', 1, 'error', 'boom',
               'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
           WHERE id = $1""",
        created["id"],
    )
    await responses.call(api, "GET", url, one, 200)
    await responses.call(api, "DELETE", url, one, 409)
    running = await responses.call(api, "POST", jobs, jobs, 201, json={"type": "t"})
    await pool.execute(
        "UPDATE jobs SET state = 'RUNNING', attempt = 1, scheduled_at = now(), started_at = now()"
        " WHERE id = $1",
        running["id"],
    )
    # 202: cancelling a RUNNING job is requested of its worker (409 before that existed).
    await responses.call(api, "DELETE", f"{jobs}/{running['id']}", one, {202, 409})
    later = await responses.call(
        api, "POST", jobs, jobs, 201, json={"type": "t", "run_at": "2030-01-01T00:00:00+02:00"}
    )
    await responses.call(api, "DELETE", f"{jobs}/{later['id']}", one, 200)
    retry, run = f"{one}/retry", f"{one}/run"
    await responses.call(api, "POST", f"{url}/retry", retry, 200)
    await responses.call(api, "POST", f"{url}/retry", retry, 409)
    await responses.call(api, "POST", f"{jobs}/{ids.new_id()}/retry", retry, 404)
    await responses.call(api, "POST", f"{url}/run", run, 200)
    await responses.call(api, "POST", f"{jobs}/{running['id']}/run", run, 409)
    await responses.call(api, "POST", f"{jobs}/{ids.new_id()}/run", run, 404)
    history = f"{one}/events"
    await responses.call(api, "GET", f"{url}/events", history, 200)
    await responses.call(api, "GET", f"{jobs}/{ids.new_id()}/events", history, 404)
    await responses.call(api, "GET", f"{url}?wait=100ms", one, 200)
    await responses.call(api, "GET", f"{url}?wait=soon", one, 400)
    # The stream's 200 stays open (tests/integration/test_events.py reads it).
    stream = "/api/v1/events"
    await responses.call(api, "GET", f"{stream}?queue=a.b", stream, 400)
    bulk_cancel, bulk_retry = f"{jobs}/cancel", f"{jobs}/retry"
    cancelled = await responses.call(
        api, "POST", bulk_cancel, bulk_cancel, 200, json={"ids": [later["id"]]}
    )
    assert cancelled == {"cancelled": 0, "cancel_requested": 0}
    await responses.call(api, "POST", bulk_cancel, bulk_cancel, 400, json={})
    retried = await responses.call(
        api, "POST", bulk_retry, bulk_retry, 200, json={"ids": [later["id"]]}
    )
    assert retried == {"retried": 1}
    await responses.call(api, "POST", bulk_retry, bulk_retry, 400, json={"state": "PENDING"})
    await responses.call(api, "GET", f"{jobs}/{ids.new_id()}", one, 404)
    await responses.call(api, "DELETE", f"{jobs}/not-an-id", one, 404)
    page = await responses.call(api, "GET", f"{jobs}?limit=1", jobs, 200)
    assert page["next_cursor"] == later["id"]
    await responses.call(api, "GET", f"{jobs}?state=failed&cursor={later['id']}", jobs, 200)
    await responses.call(api, "GET", f"{jobs}?limit=0", jobs, 400)
    await responses.call(api, "POST", jobs, jobs, 400, json={"type": "t", "priority": 1001})
    await responses.call(api, "POST", jobs, jobs, 400, data=b"[]", headers=JSON)
    await responses.call(
        api, "POST", jobs, jobs, 415, data=b"{}", headers={"Content-Type": "text/plain"}
    )
    too_big = orjson.dumps({"type": "t", "payload": {"x": "x" * (1024 * 1024)}})
    await responses.call(api, "POST", jobs, jobs, 413, data=io.BytesIO(too_big), headers=JSON)
    stats = await responses.call(api, "GET", "/api/v1/stats", "/api/v1/stats", 200)
    assert stats["total"] == 3
    batch = "/api/v1/jobs/batch"
    made = await responses.call(
        api, "POST", batch, batch, 201, json={"jobs": [{"type": "t"}, {"type": "u"}]}
    )
    assert made["created"] == 2
    await responses.call(api, "POST", batch, batch, 400, json={"jobs": []})
    queues, queue = "/api/v1/queues", "/api/v1/queues/{queue}"
    await responses.call(api, "GET", queues, queues, 200)
    await responses.call(api, "GET", f"{queues}/default", queue, 200)
    await responses.call(api, "GET", f"{queues}/nobody", queue, 404)
    await responses.call(api, "GET", f"{queues}/bad%20name", queue, 400)
    await responses.call(api, "PATCH", f"{queues}/default", queue, 200, json={"key_limit": 4})
    await responses.call(api, "PATCH", f"{queues}/default", queue, 400, json={"key_limit": 0})
    await responses.call(api, "POST", f"{queues}/default/pause", f"{queue}/pause", 200)
    await responses.call(api, "POST", f"{queues}/bad%20name/pause", f"{queue}/pause", 400)
    await responses.call(api, "POST", f"{queues}/default/resume", f"{queue}/resume", 200)
    await responses.call(api, "POST", f"{queues}/nobody/resume", f"{queue}/resume", 404)
    await responses.call(api, "POST", f"{queues}/bad%20name/resume", f"{queue}/resume", 400)
    await responses.call(api, "PATCH", f"{queues}/default", queue, 200, json={"running_limit": 9})
    limits, limit = "/api/v1/rate-limits", "/api/v1/rate-limits/{name}"
    await responses.call(api, "POST", limits, limits, 201, json={"name": "r", "per_second": 2.5})
    await responses.call(api, "POST", limits, limits, 409, json={"name": "r", "per_second": 1})
    await responses.call(api, "POST", limits, limits, 400, json={"name": "r"})
    await responses.call(api, "GET", limits, limits, 200)
    await responses.call(api, "GET", f"{limits}/r", limit, 200)
    await responses.call(api, "GET", f"{limits}/nobody", limit, 404)
    await responses.call(api, "GET", f"{limits}/bad%20name", limit, 400)
    await responses.call(api, "PATCH", f"{limits}/r", limit, 200, json={"burst": 7})
    await responses.call(api, "PATCH", f"{limits}/r", limit, 400, json={"burst": 0})
    await responses.call(api, "PATCH", f"{limits}/nobody", limit, 404, json={"burst": 7})
    await responses.call(api, "POST", jobs, jobs, 422, json={"type": "t", "rate_limit": "zz"})
    await responses.call(api, "POST", jobs, jobs, 201, json={"type": "t", "rate_limit": "r"})
    await responses.call(api, "DELETE", f"{limits}/r", limit, 409)
    await pool.execute(
        "UPDATE jobs SET state = 'CANCELLED', completed_at = now() WHERE rate_limit = 'r'"
    )
    await responses.call(api, "DELETE", f"{limits}/r", limit, 200)
    await responses.call(api, "DELETE", f"{limits}/r", limit, 404)
    schedules, schedule = "/api/v1/schedules", "/api/v1/schedules/{name}"
    nightly = {"name": "nightly", "cron": "0 3 * * *", "job": {"type": "t", "payload": {}}}
    await responses.call(api, "POST", schedules, schedules, 201, json=nightly)
    await responses.call(api, "POST", schedules, schedules, 409, json=nightly)
    await responses.call(api, "POST", schedules, schedules, 400, json={**nightly, "cron": "x"})
    await responses.call(api, "GET", schedules, schedules, 200)
    await responses.call(api, "GET", f"{schedules}/nightly", schedule, 200)
    await responses.call(api, "GET", f"{schedules}/nobody", schedule, 404)
    await responses.call(api, "GET", f"{schedules}/bad%20name", schedule, 400)
    paused = await responses.call(
        api, "PATCH", f"{schedules}/nightly", schedule, 200, json={"paused": True}
    )
    assert paused["next_runs"] == []
    await responses.call(api, "PATCH", f"{schedules}/nightly", schedule, 400, json={"overlap": "x"})
    await responses.call(api, "PATCH", f"{schedules}/nobody", schedule, 404, json={"paused": True})
    await responses.call(api, "DELETE", f"{schedules}/nightly", schedule, 200)
    await responses.call(api, "DELETE", f"{schedules}/nightly", schedule, 404)
    flows, flow = "/api/v1/workflows", "/api/v1/workflows/{id}"
    made = await responses.call(
        api,
        "POST",
        flows,
        flows,
        201,
        json={
            "name": "w",
            "jobs": [{"key": "a", "type": "t"}, {"key": "b", "type": "t", "depends_on": ["a"]}],
        },
    )
    await responses.call(
        api,
        "POST",
        flows,
        flows,
        400,
        json={"jobs": [{"key": "a", "type": "t", "depends_on": ["a"]}]},
    )
    await responses.call(api, "GET", f"{flows}/{made['id']}", flow, 200)
    await responses.call(api, "GET", f"{flows}/{ids.new_id()}", flow, 404)
    await responses.call(api, "DELETE", f"{flows}/{made['id']}", flow, 200)
    await responses.call(api, "DELETE", f"{flows}/nope", flow, 404)
    await responses.call(api, "GET", "/health", "/health", 200)
    await responses.call(api, "GET", "/ready", "/ready", 200)
    await responses.call(api, "GET", "/metrics", "/metrics", 200)
    await responses.call(api, "GET", "/openapi.json", "/openapi.json", 200)
    # Every documented path has been called with at least one of its methods.
    assert {path for _, path, _ in responses.checked} == set(responses.document["paths"])


async def test_unavailable_database_answers_match_the_document(settings: Settings) -> None:
    dead = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    app = build_app(settings, dead)
    try:
        async with served(app) as url, aiohttp.ClientSession() as http:
            api = Api(url=url, http=http, app=app)
            responses = Responses(openapi.build_document(settings.api.max_body_bytes))
            await responses.call(api, "GET", "/api/v1/stats", "/api/v1/stats", 503)
            await responses.call(api, "GET", "/api/v1/jobs", "/api/v1/jobs", 503)
            await responses.call(
                api, "POST", "/api/v1/jobs", "/api/v1/jobs", 503, json={"type": "t"}
            )
            await responses.call(api, "GET", "/ready", "/ready", 503)
    finally:
        await dead.close()
