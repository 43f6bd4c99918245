"""The API's edge: JSON bodies and query strings in, validated values out.

Everything a client sends is checked here before anything touches the database,
and every refusal is an :class:`ApiError` that says which field is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from orchestrix import ids
from orchestrix.db.jobs import LARGE_FIELDS, JobFilter
from orchestrix.models import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, DEFAULT_TIMEOUT_SECONDS, NewJob
from orchestrix.services.api.errors import ApiError
from orchestrix.states import JobState

# Types name executors; queues become a NATS subject token, so no dots or wildcards.
TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The name of a rate limit (db.rate_limits), as a job names it.
RATE_LIMIT_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
PRIORITY_RANGE = (-1000, 1000)
MAX_ATTEMPTS_RANGE = (1, 100)
TIMEOUT_SECONDS_RANGE = (1, 7 * 24 * 3600)
IDEMPOTENCY_KEY_MAX = 255
# No control characters. Every pattern here is matched whole (fullmatch): with
# re.match, "$" would also match before a trailing newline.
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"^[^\x00-\x1f\x7f]{{1,{IDEMPOTENCY_KEY_MAX}}}$")
# ?wait= on a GET of a job, and the longest wait (a longer one is cut to it).
WAIT_PATTERN = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(ms|s)?")
WAIT_MAX_S = 120.0
CONCURRENCY_KEY_MAX = 255
CONCURRENCY_KEY_PATTERN = re.compile(rf"^[^\x00-\x1f\x7f]{{1,{CONCURRENCY_KEY_MAX}}}$")
LIMIT_RANGE = (1, 1000)
DEFAULT_LIMIT = 10
_DECIMAL = re.compile(r"-?[0-9]{1,18}")
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$",
    re.IGNORECASE | re.ASCII,
)

CREATE_FIELDS = frozenset(
    {
        "type",
        "payload",
        "queue",
        "priority",
        "max_attempts",
        "run_at",
        "timeout_seconds",
        "idempotency_key",
        "concurrency_key",
        "rate_limit",
    }
)
LIST_PARAMS = frozenset({"state", "type", "queue", "limit", "cursor", "include"})
# ?include= on a list: which of the large fields to show, comma-separated.
_LARGE = "|".join(LARGE_FIELDS)
INCLUDE_PATTERN = re.compile(rf"^(?:(?:{_LARGE})(?:,(?:{_LARGE}))*)?$")
BATCH_MAX = 1000


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    body = await request.read()  # aiohttp raises 413 past client_max_size
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def parse_batch(data: Mapping[str, Any], created_by_key: str | None = None) -> list[NewJob]:
    """``{"jobs": [...]}``: 1 to BATCH_MAX jobs, each checked like a single create."""
    unknown = sorted(set(data) - {"jobs"})
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    items = data.get("jobs")
    if not isinstance(items, list) or not 1 <= len(items) <= BATCH_MAX:
        raise ApiError(400, f"jobs must be an array of 1 to {BATCH_MAX} jobs")
    batch: list[NewJob] = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise ApiError(400, "must be a JSON object")
            new = parse_new_job(item, created_by_key)
        except ApiError as exc:
            raise ApiError(exc.status, f"jobs[{index}]: {exc.message}") from None
        batch.append(new)
    return batch


def parse_new_job(data: Mapping[str, Any], created_by_key: str | None = None) -> NewJob:
    """A job to create, for the API key named ``created_by_key`` (None: auth is off)."""
    # Only the fields given are checked (the defaults are valid): the checks were a
    # fifth of a batch create's CPU.
    if not data.keys() <= CREATE_FIELDS:
        unknown = sorted(set(data) - CREATE_FIELDS)
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    if "type" not in data:
        raise ApiError(400, "type is required")
    payload = data.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise ApiError(400, "payload must be a JSON object")
    elif payload:
        _check_no_nul(payload)
    return NewJob(
        type=checked_name("type", data["type"], TYPE_PATTERN),
        payload=payload,
        queue=checked_name("queue", data["queue"], QUEUE_PATTERN)
        if "queue" in data
        else DEFAULT_QUEUE,
        priority=checked_int("priority", data["priority"], PRIORITY_RANGE)
        if "priority" in data
        else 0,
        max_attempts=(
            checked_int("max_attempts", data["max_attempts"], MAX_ATTEMPTS_RANGE)
            if "max_attempts" in data
            else DEFAULT_MAX_ATTEMPTS
        ),
        run_at=optional_time("run_at", data.get("run_at")),
        timeout_seconds=(
            checked_int("timeout_seconds", data["timeout_seconds"], TIMEOUT_SECONDS_RANGE)
            if "timeout_seconds" in data
            else DEFAULT_TIMEOUT_SECONDS
        ),
        idempotency_key=_idempotency_key(data.get("idempotency_key")),
        concurrency_key=_concurrency_key(data.get("concurrency_key")),
        rate_limit=(
            None
            if data.get("rate_limit") is None
            else checked_name("rate_limit", data["rate_limit"], RATE_LIMIT_PATTERN)
        ),
        created_by_key=created_by_key,
    )


@dataclass(frozen=True)
class ListQuery:
    """``GET /api/v1/jobs``: which jobs, how many at most, after which, with what."""

    where: JobFilter
    limit: int
    cursor: str | None
    include: frozenset[str]


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """``?state=&type=&queue=&limit=&cursor=&include=``."""
    unknown = sorted(set(query) - LIST_PARAMS)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")
    state = None
    if query.get("state"):
        try:
            # ASCII only: str.upper() would turn "fa\u0131led" into "FAILED".
            if not query["state"].isascii():
                raise ValueError(query["state"])
            state = JobState(query["state"].upper())
        except ValueError:
            allowed = ", ".join(s.value for s in JobState)
            raise ApiError(400, f"state must be one of {allowed}") from None
    job_type = checked_name("type", query["type"], TYPE_PATTERN) if query.get("type") else None
    queue = checked_name("queue", query["queue"], QUEUE_PATTERN) if query.get("queue") else None
    limit = DEFAULT_LIMIT
    if query.get("limit"):
        # Decimal ASCII digits only: int() would also take "+5", "5_0" and "\u0665".
        if not _DECIMAL.fullmatch(query["limit"]):
            raise ApiError(400, "limit must be an integer")
        limit = int(query["limit"])
        checked_int("limit", limit, LIMIT_RANGE)
    cursor = query.get("cursor") or None
    if cursor is not None and not ids.is_valid(cursor):
        raise ApiError(400, "cursor must be a job id, as returned in next_cursor")
    included = query.get("include", "")
    if not INCLUDE_PATTERN.fullmatch(included):
        raise ApiError(400, f"include must be a comma-separated list of {', '.join(LARGE_FIELDS)}")
    return ListQuery(
        where=JobFilter(state=state, type=job_type, queue=queue),
        limit=limit,
        cursor=cursor,
        include=frozenset(included.split(",")) - {""},
    )


def checked_name(field: str, value: Any, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ApiError(
            400,
            f"{field} must be a string matching {pattern.pattern}",
        )
    return value


def checked_int(field: str, value: Any, bounds: tuple[int, int]) -> int:
    low, high = bounds
    # bool is an int in Python, but `true` is not a number in JSON.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{field} must be an integer from {low} to {high}")
    return value


def optional_time(field: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ApiError(400, f"{field} must be an RFC 3339 time such as 2026-01-31T09:54:37Z")
    try:
        moment = datetime.fromisoformat(value.upper())
    except ValueError:
        raise ApiError(400, f"{field} is not a valid date and time: {value}") from None
    try:
        return moment.astimezone(UTC)  # stored and shown in UTC
    except OverflowError:
        # An offset moved it past year 1 or 9999 in UTC: a time near that edge stands
        # in (either way, "long ago" or "far ahead"). Not datetime.min/max exactly:
        # asyncpg stores those as -infinity/infinity.
        return _EARLIEST if moment.year == 1 else _LATEST


def _idempotency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
        raise ApiError(
            400,
            f"idempotency_key must be a string of 1 to {IDEMPOTENCY_KEY_MAX} characters "
            "without control characters",
        )
    return value


def _concurrency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not CONCURRENCY_KEY_PATTERN.fullmatch(value):
        raise ApiError(
            400,
            f"concurrency_key must be a string of 1 to {CONCURRENCY_KEY_MAX} characters "
            "without control characters",
        )
    return value


def _check_no_nul(payload: dict[str, Any]) -> None:
    """PostgreSQL's jsonb cannot hold U+0000; refuse it here rather than fail on insert."""
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if "\x00" in key:
                    raise ApiError(400, "payload must not contain the character U+0000")
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and "\x00" in item:
            raise ApiError(400, "payload must not contain the character U+0000")


def parse_wait(query: Mapping[str, str]) -> float:
    """``?wait=``: seconds (``30``), or with a unit (``30s``, ``500ms``); 0 when absent.
    A longer wait than WAIT_MAX_S waits WAIT_MAX_S."""
    text = query.get("wait")
    if text is None:
        return 0.0
    match = WAIT_PATTERN.fullmatch(text)
    if match is None:
        raise ApiError(400, f"wait must be a duration such as 30, 30s or 500ms, got {text!r}")
    seconds = float(match.group(1)) * (0.001 if match.group(2) == "ms" else 1.0)
    return min(seconds, WAIT_MAX_S)
