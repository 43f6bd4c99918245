"""The API's OpenAPI 3 document, built from the code that enforces what it says.

Every pattern, range and default comes from the module that applies it:
``services.api.parsing`` (request limits), ``orchestrix.models`` (defaults and the
fields of a job), ``orchestrix.states`` (the states) and ``orchestrix.errors``
(the length of an error text). The ``Job`` schema is derived from the fields of
:class:`orchestrix.models.Job`, so a new field shows up here without anyone
editing this file, and a field of a type this module does not know how to
describe fails the build of the document (and so the tests).
``GET /openapi.json`` serves the document, built once per body and page limit;
``tests/integration/test_openapi.py`` checks that it lists every route and that
real answers match it, and ``tests/e2e/test_fuzz.py`` fuzzes the API against it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from orchestrix.apikeys import ADMIN
from orchestrix.cron import MAX_EXPRESSION_CHARS
from orchestrix.db.jobs import LARGE_FIELDS
from orchestrix.db.schedules import TEMPLATE_FIELDS
from orchestrix.errors import MAX_ERROR_CHARS
from orchestrix.models import Job, NewJob
from orchestrix.services.api.auth import OPEN, ROUTE_SCOPES, scope_of
from orchestrix.services.api.bulk import CANCEL_STATES, RETRY_STATES
from orchestrix.services.api.bulk import IDS_MAX as BULK_IDS_MAX
from orchestrix.services.api.errors import MAX_BODY
from orchestrix.services.api.jobs import STATS_TYPES_MAX
from orchestrix.services.api.keys import AUTH, LIST_MAX_BYTES
from orchestrix.services.api.parsing import (
    BATCH_MAX,
    CONCURRENCY_KEY_MAX,
    CONCURRENCY_KEY_PATTERN,
    CREATE_FIELDS,
    DEFAULT_LIMIT,
    IDEMPOTENCY_KEY_MAX,
    IDEMPOTENCY_KEY_PATTERN,
    INCLUDE_PATTERN,
    LIMIT_RANGE,
    MAX_ATTEMPTS_RANGE,
    PRIORITY_RANGE,
    QUEUE_PATTERN,
    RATE_LIMIT_PATTERN,
    TIMEOUT_SECONDS_RANGE,
    TYPE_PATTERN,
    WAIT_MAX_S,
    WAIT_PATTERN,
)
from orchestrix.services.api.queues import KEY_LIMIT_RANGE, RUNNING_LIMIT_RANGE
from orchestrix.services.api.rate_limits import BURST_RANGE, PER_SECOND_MAX, PER_SECOND_MIN
from orchestrix.services.api.schedules import (
    CATCH_UP_RANGE,
    MISSED,
    NEXT_RUNS,
    OVERLAP,
)
from orchestrix.services.api.schedules import DEFAULTS as SCHEDULE_DEFAULTS
from orchestrix.services.api.schedules import NAME_PATTERN as SCHEDULE_NAME_PATTERN
from orchestrix.services.api.workflows import KEY_PATTERN as WORKFLOW_KEY_PATTERN
from orchestrix.services.api.workflows import NAME_MAX as WORKFLOW_NAME_MAX
from orchestrix.services.api.workflows import WORKFLOW_JOBS_MAX
from orchestrix.settings import ApiSettings, AuthSettings
from orchestrix.states import JobState

Schema = dict[str, Any]

OPENAPI_VERSION = "3.0.3"
DOCUMENT_PATH = "/openapi.json"
# What orchestrix.ids.new_id makes and ids.is_valid accepts: a canonical ULID.
ULID_PATTERN = "^[0-7][0-9A-HJKMNP-TV-Z]{25}$"
EVENT_ID_PATTERN = "^[0-9]{1,19}-[0-9]{1,19}$"
# JobState values in any letter case, as ?state= accepts them (ASCII letters only).
STATE_ANY_CASE_PATTERN = (
    "^(?:"
    + "|".join("".join(f"[{c.upper()}{c.lower()}]" for c in s.value) for s in JobState)
    + ")$"
)

routes = web.RouteTableDef()


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_empty(pattern: str) -> str:
    """``pattern`` for a query parameter, where an empty value means the parameter is absent."""
    return f"^(?:{pattern.removeprefix('^').removesuffix('$')})?$"


def _range(bounds: tuple[int, int]) -> Schema:
    low, high = bounds
    return {"type": "integer", "minimum": low, "maximum": high}


_DATE_TIME: Schema = {"type": "string", "format": "date-time"}

# What orchestrix.errors.storable_error makes of an attempt's error.
_ERROR_TEXT = (
    f"`ClassName: message`, at most {MAX_ERROR_CHARS} characters: U+0000 and lone "
    "surrogates become U+FFFD, and a longer text keeps its beginning and ends with "
    "`… [N of M characters cut]`. `UnstorableError: ...` when PostgreSQL refused the text."
)

# What each field of a job means, and the limits the API enforces on it. Types
# and nullability come from the dataclass; this only adds to them.
_JOB_FIELD_DETAILS: dict[str, Schema] = {
    "id": {"pattern": ULID_PATTERN, "description": "ULID; ids sort by creation time"},
    "type": {"pattern": TYPE_PATTERN.pattern, "description": "names the executor that runs it"},
    "queue": {"pattern": QUEUE_PATTERN.pattern},
    "payload": {"description": "the JSON object the job was created with"},
    "priority": _range(PRIORITY_RANGE),
    "attempt": {
        "minimum": 0,
        "description": "the attempt running or run last; 0 until a worker first claims it",
    },
    "max_attempts": _range(MAX_ATTEMPTS_RANGE),
    "timeout_seconds": _range(TIMEOUT_SECONDS_RANGE),
    "idempotency_key": {
        "minLength": 1,
        "maxLength": IDEMPOTENCY_KEY_MAX,
        "pattern": IDEMPOTENCY_KEY_PATTERN.pattern,
    },
    "run_at": {"description": "when the job is due; after a failed attempt, when the retry is"},
    "result": {"description": "what the executor returned, once the job has SUCCEEDED"},
    "last_error": {
        "maxLength": MAX_ERROR_CHARS,
        "description": f"the error of the newest entry of errors. {_ERROR_TEXT}",
    },
    "errors": {"items": _ref("AttemptError"), "description": "one entry per failed attempt"},
    "scheduled_at": {"description": "when a worker claimed the latest attempt"},
    "started_at": {"description": "when the latest attempt started"},
    "worker_id": {"description": "the worker process running the latest attempt, or that ran it"},
    "handoffs": {
        "minimum": 0,
        "description": "hand-backs in a row by stopping workers (attempts not counted)",
    },
    "completed_at": {"description": "set only in SUCCEEDED, FAILED and CANCELLED"},
    "schedule": {"description": "the cron schedule that created the job, if one did"},
    "tick_at": {"description": "the nominal time of the schedule's tick the job is for"},
    "progress": {
        "description": "what the executor last reported with job.progress(...), any JSON "
        "value; written at most once a second while it runs"
    },
    "progress_at": {"description": "when that report was written"},
    "created_by_key": {
        "description": "the name of the API key that created the job; null with "
        "authentication off, or for a schedule's jobs"
    },
    "cancelled_by_key": {
        "description": "the name of the API key that cancelled the job (or asked its worker "
        "to); null with authentication off, or when no key did"
    },
}


def _schema_of_type(hint: Any, where: str) -> Schema:
    """A JSON schema for one field type of a dataclass, as ``Job.to_json`` renders it."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(members) == len(typing.get_args(hint)) or len(members) != 1:
            raise TypeError(f"{where}: cannot describe the union {hint!r}")
        schema = _schema_of_type(members[0], where)
        return {**schema, "nullable": True} if "type" in schema else schema
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return {"description": "any JSON value"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if isinstance(hint, type) and issubclass(hint, JobState):
        return {"type": "string", "enum": [state.value for state in JobState]}
    if hint is str:
        return {"type": "string"}
    if hint is datetime:
        return dict(_DATE_TIME)
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return {"type": "object"}
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return {"type": "array", "items": _schema_of_type(item, where)}
    raise TypeError(f"{where}: no JSON schema for the type {hint!r}")


def job_schema() -> Schema:
    """Every field ``Job.to_json`` emits, typed from the ``Job`` dataclass."""
    hints = typing.get_type_hints(Job)
    properties: dict[str, Schema] = {}
    for item in dataclasses.fields(Job):
        schema = _schema_of_type(hints[item.name], f"Job.{item.name}")
        properties[item.name] = {**schema, **_JOB_FIELD_DETAILS.get(item.name, {})}
    unknown = sorted(set(_JOB_FIELD_DETAILS) - set(properties))
    if unknown:
        raise TypeError(f"details for fields Job does not have: {', '.join(unknown)}")
    return {
        "type": "object",
        "description": "A job as the API shows it. Times are RFC 3339 in UTC.",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def listed_job_schema() -> Schema:
    """A job in a list: the ``Job``, whose large fields are there only if included."""
    schema = job_schema()
    return {
        **schema,
        "description": "A job as a list shows it: "
        + ", ".join(LARGE_FIELDS)
        + " only when named in ?include=. Times are RFC 3339 in UTC.",
        "required": [name for name in schema["required"] if name not in LARGE_FIELDS],
    }


def new_job_schema() -> Schema:
    """The body of ``POST /api/v1/jobs``, with the limits ``parse_new_job`` enforces."""
    defaults = {item.name: item.default for item in dataclasses.fields(NewJob)}
    properties: dict[str, Schema] = {
        "type": {
            "type": "string",
            "pattern": TYPE_PATTERN.pattern,
            "description": "1 to 128 characters: letters, digits and _ . : -, not starting "
            "with . : or -. It names the executor that runs the job.",
        },
        "payload": {
            "type": "object",
            "nullable": True,
            "default": {},
            "description": "any JSON object (null means {}) without the character U+0000. "
            "The whole body is limited to API_MAX_BODY_BYTES.",
        },
        "queue": {
            "type": "string",
            "pattern": QUEUE_PATTERN.pattern,
            "default": defaults["queue"],
            "description": "1 to 64 letters, digits, _ or -",
        },
        "priority": {
            **_range(PRIORITY_RANGE),
            "default": defaults["priority"],
            "description": "among due jobs, a higher priority is claimed first",
        },
        "max_attempts": {
            **_range(MAX_ATTEMPTS_RANGE),
            "default": defaults["max_attempts"],
            "description": "all attempts, the first included",
        },
        "run_at": {
            **_DATE_TIME,
            "nullable": True,
            "description": "RFC 3339 with Z or an offset; absent or null means now",
        },
        "timeout_seconds": {
            **_range(TIMEOUT_SECONDS_RANGE),
            "default": defaults["timeout_seconds"],
            "description": "the limit for each attempt",
        },
        "idempotency_key": {
            "type": "string",
            "nullable": True,
            "minLength": 1,
            "maxLength": IDEMPOTENCY_KEY_MAX,
            "pattern": IDEMPOTENCY_KEY_PATTERN.pattern,
            "description": "unique across all jobs; a repeat answers 200 with the first job. "
            "No control characters.",
        },
        "concurrency_key": {
            "type": "string",
            "nullable": True,
            "minLength": 1,
            "maxLength": CONCURRENCY_KEY_MAX,
            "pattern": CONCURRENCY_KEY_PATTERN.pattern,
            "description": "at most the queue's key_limit jobs (1 unless set) with this key "
            "run at once, fleet-wide; keys share free capacity in turns. No control "
            "characters.",
        },
        "rate_limit": {
            "type": "string",
            "nullable": True,
            "pattern": RATE_LIMIT_PATTERN.pattern,
            "description": "the name of a rate limit (POST /api/v1/rate-limits) each start "
            "of this job counts against, fleet-wide; a job it holds back waits. A name no "
            "limit has is refused (422).",
        },
    }
    if set(properties) != CREATE_FIELDS:
        raise TypeError("the NewJob schema does not list exactly parsing.CREATE_FIELDS")
    return {
        "type": "object",
        "properties": properties,
        "required": ["type"],
        "additionalProperties": False,
    }


def _schemas() -> dict[str, Schema]:
    count = {"type": "integer", "minimum": 0}
    return {
        "Job": job_schema(),
        "ListedJob": listed_job_schema(),
        "NewJob": new_job_schema(),
        "AttemptError": {
            "type": "object",
            "properties": {
                "attempt": {"type": "integer", "minimum": 1},
                "error": {
                    "type": "string",
                    "maxLength": MAX_ERROR_CHARS,
                    "description": _ERROR_TEXT,
                },
                "at": dict(_DATE_TIME),
            },
            "required": ["attempt", "error", "at"],
        },
        "NewJobBatch": {
            "type": "object",
            "properties": {
                "jobs": {
                    "type": "array",
                    "items": _ref("NewJob"),
                    "minItems": 1,
                    "maxItems": BATCH_MAX,
                    "description": "each job as for a single create; a job whose "
                    "idempotency_key was used before, in the table or earlier in the batch, "
                    "is that earlier job",
                },
            },
            "required": ["jobs"],
            "additionalProperties": False,
        },
        "JobBatch": {
            "type": "object",
            "properties": {
                "jobs": {"type": "array", "items": _ref("Job"), "description": "in request order"},
                "created": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "how many were new (the rest had an idempotency key "
                    "used before and are those earlier jobs)",
                },
            },
            "required": ["jobs", "created"],
            "additionalProperties": False,
        },
        "Event": {
            "type": "object",
            "description": "One state change of a job, written in the same transaction.",
            "properties": {
                "id": {
                    "type": "string",
                    "pattern": EVENT_ID_PATTERN,
                    "description": "its place in the feed of GET /api/v1/events "
                    "(the Last-Event-ID to resume after it)",
                },
                "job_id": {"type": "string", "pattern": ULID_PATTERN},
                "from": {
                    "type": "string",
                    "nullable": True,
                    "enum": [*(s.value for s in JobState), None],
                    "description": "null: the job was created",
                },
                "to": {"type": "string", "enum": [s.value for s in JobState]},
                "attempt": {
                    **count,
                    "description": "the attempt the change concerns: the one claimed, or "
                    "the one that ended (0 before the first)",
                },
                "at": dict(_DATE_TIME),
                "by": {
                    "type": "string",
                    "nullable": True,
                    "description": "who made the change: worker:<worker id>, "
                    "rescuer:<host:pid>, lifeline:<host:pid>, schedule:<name>, "
                    "api:<host:pid>; null when not known",
                },
                "queue": {"type": "string"},
                "type": {"type": "string"},
                "workflow_id": {"type": "string", "nullable": True, "pattern": ULID_PATTERN},
            },
            "required": [
                "id",
                "job_id",
                "from",
                "to",
                "attempt",
                "at",
                "by",
                "queue",
                "type",
                "workflow_id",
            ],
            "additionalProperties": False,
        },
        "EventList": {
            "type": "object",
            "properties": {
                "events": {"type": "array", "items": _ref("Event"), "description": "oldest first"}
            },
            "required": ["events"],
            "additionalProperties": False,
        },
        "JobList": {
            "type": "object",
            "properties": {
                "jobs": {
                    "type": "array",
                    "items": _ref("ListedJob"),
                    "description": "newest first; at most limit jobs, and fewer when the "
                    "next one would take the body past API_LIST_MAX_BYTES",
                },
                "next_cursor": {
                    "type": "string",
                    "nullable": True,
                    "pattern": ULID_PATTERN,
                    "description": "pass as ?cursor= for the next page; null on the last page",
                },
            },
            "required": ["jobs", "next_cursor"],
            "additionalProperties": False,
        },
        "Stats": {
            "type": "object",
            "properties": {
                "jobs": {
                    "type": "object",
                    "properties": {state.value: count for state in JobState},
                    "required": [state.value for state in JobState],
                    "additionalProperties": False,
                },
                "total": count,
                "workers": {**count, "description": "worker processes registered now"},
                "waiting_for_executor": {
                    "type": "object",
                    "description": "waiting jobs (PENDING or RETRYING, due now or later) "
                    "that no registered worker can run (their type or queue is served by "
                    "none): they wait, they do not fail",
                    "properties": {
                        "total": count,
                        "types": {
                            "type": "object",
                            "additionalProperties": count,
                            "description": f"by job type, the {STATS_TYPES_MAX} largest",
                        },
                    },
                    "required": ["total", "types"],
                    "additionalProperties": False,
                },
            },
            "required": ["jobs", "total", "workers", "waiting_for_executor"],
            "additionalProperties": False,
        },
        "Queue": {
            "type": "object",
            "description": "A queue: any queue a job names, and any queue ever paused.",
            "properties": {
                "name": {"type": "string", "pattern": QUEUE_PATTERN.pattern},
                "paused": {
                    "type": "boolean",
                    "description": "no worker claims its jobs; the ones running finish",
                },
                "paused_at": {**_DATE_TIME, "nullable": True},
                "jobs": {
                    "type": "object",
                    "properties": {state.value: count for state in JobState},
                    "required": [state.value for state in JobState],
                    "additionalProperties": False,
                },
                "total": count,
                "oldest_due_at": {
                    **_DATE_TIME,
                    "nullable": True,
                    "description": "run_at of the oldest job that is due and waits "
                    "(PENDING or RETRYING); null when none waits",
                },
                "oldest_due_age_seconds": {
                    "type": "number",
                    "minimum": 0,
                    "nullable": True,
                    "description": "how long that job has been due",
                },
                "key_limit": {
                    "type": "integer",
                    "nullable": True,
                    "minimum": KEY_LIMIT_RANGE[0],
                    "maximum": KEY_LIMIT_RANGE[1],
                    "description": "at most this many jobs of one concurrency_key run at "
                    "once, fleet-wide; null: 1",
                },
                "running_limit": {
                    "type": "integer",
                    "nullable": True,
                    "minimum": RUNNING_LIMIT_RANGE[0],
                    "maximum": RUNNING_LIMIT_RANGE[1],
                    "description": "at most this many of the queue's jobs run at once, "
                    "fleet-wide; null: no limit",
                },
            },
            "required": [
                "name",
                "paused",
                "paused_at",
                "jobs",
                "total",
                "oldest_due_at",
                "oldest_due_age_seconds",
                "key_limit",
                "running_limit",
            ],
            "additionalProperties": False,
        },
        "RateLimit": {
            "type": "object",
            "properties": {
                "name": _RATE_LIMIT_NAME,
                "per_second": {**_PER_SECOND, "description": "tokens the bucket gains a second"},
                "burst": {
                    **_BURST,
                    "description": "the most tokens the bucket holds: the starts in any "
                    "span of t seconds are at most burst + per_second * t",
                },
                "available": {
                    "type": "number",
                    "minimum": 0,
                    "description": "tokens in the bucket now",
                },
                "created_at": dict(_DATE_TIME),
                "updated_at": dict(_DATE_TIME),
            },
            "required": ["name", "per_second", "burst", "available", "created_at", "updated_at"],
            "additionalProperties": False,
        },
        "NewRateLimit": {
            "type": "object",
            "properties": {
                "name": _RATE_LIMIT_NAME,
                "per_second": dict(_PER_SECOND),
                "burst": {
                    **_BURST,
                    "nullable": True,
                    "description": "default: per_second rounded up (at least 1)",
                },
            },
            "required": ["name", "per_second"],
            "additionalProperties": False,
        },
        "RateLimitChange": {
            "type": "object",
            "properties": {
                "per_second": {**_PER_SECOND, "nullable": True},
                "burst": {**_BURST, "nullable": True},
            },
            "minProperties": 1,
            "additionalProperties": False,
        },
        "RateLimitList": {
            "type": "object",
            "properties": {"rate_limits": {"type": "array", "items": _ref("RateLimit")}},
            "required": ["rate_limits"],
            "additionalProperties": False,
        },
        "QueueList": {
            "type": "object",
            "properties": {
                "queues": {"type": "array", "items": _ref("Queue"), "description": "by name"}
            },
            "required": ["queues"],
            "additionalProperties": False,
        },
        **_schedule_schemas(),
        **_workflow_schemas(),
        "CancelSelection": _selection_schema(CANCEL_STATES),
        "RetrySelection": _selection_schema(RETRY_STATES),
        "BulkCancelled": {
            "type": "object",
            "properties": {
                "cancelled": {**count, "description": "waiting jobs now CANCELLED"},
                "cancel_requested": {
                    **count,
                    "description": "running jobs whose workers were asked to stop them",
                },
            },
            "required": ["cancelled", "cancel_requested"],
            "additionalProperties": False,
        },
        "BulkRetried": {
            "type": "object",
            "properties": {"retried": {**count, "description": "jobs now PENDING again"}},
            "required": ["retried"],
            "additionalProperties": False,
        },
        "Error": {
            "type": "object",
            "properties": {"error": {"type": "string"}},
            "required": ["error"],
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
            "required": ["status"],
        },
        "Ready": {
            "type": "object",
            "properties": {
                "status": {
                    "type": "string",
                    "enum": ["ready", "degraded", "unavailable"],
                    "description": (
                        "degraded (still 200): NATS is away; jobs are created, read and"
                        " cancelled as usual, and a running job's worker learns of its"
                        " cancellation at its next lease renewal"
                    ),
                },
                "error": {"type": "string", "description": "why, when unavailable"},
                "warning": {"type": "string", "description": "what is away, when degraded"},
                "checks": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": 'postgres, nats and shutdown: "ok" or the reason',
                },
            },
            "required": ["status", "checks"],
        },
    }


def _selection_schema(states: tuple[JobState, ...]) -> Schema:
    """The body of a bulk action: which jobs, for an action on jobs in ``states``."""
    return {
        "type": "object",
        "description": "Which jobs: every field given must hold; at least one is required",
        "properties": {
            "ids": {
                "type": "array",
                "items": {"type": "string", "pattern": ULID_PATTERN},
                "minItems": 1,
                "maxItems": BULK_IDS_MAX,
            },
            "state": {"type": "string", "enum": [s.value for s in states]},
            "type": {"type": "string", "pattern": TYPE_PATTERN.pattern},
            "queue": {"type": "string", "pattern": QUEUE_PATTERN.pattern},
            "created_after": {**_DATE_TIME, "description": "inclusive"},
            "created_before": {**_DATE_TIME, "description": "exclusive"},
        },
        "minProperties": 1,
        "additionalProperties": False,
    }


def _workflow_schemas() -> dict[str, Schema]:
    new_job = new_job_schema()
    job_fields = {k: v for k, v in new_job["properties"].items() if k != "idempotency_key"}
    return {
        "NewWorkflow": {
            "type": "object",
            "properties": {
                "name": {
                    "type": "string",
                    "nullable": True,
                    "minLength": 1,
                    "maxLength": WORKFLOW_NAME_MAX,
                },
                "jobs": {
                    "type": "array",
                    "items": _ref("NewWorkflowJob"),
                    "minItems": 1,
                    "maxItems": WORKFLOW_JOBS_MAX,
                    "description": "the jobs, each with a key unique in the request; they "
                    "must form a DAG (no cycle, every depends_on a key of the request)",
                },
            },
            "required": ["jobs"],
            "additionalProperties": False,
        },
        "NewWorkflowJob": {
            "type": "object",
            "description": "a job as for POST /api/v1/jobs (no idempotency_key), with its "
            "key and the keys of the jobs it waits for",
            "properties": {
                "key": {"type": "string", "pattern": WORKFLOW_KEY_PATTERN.pattern},
                "depends_on": {
                    "type": "array",
                    "items": {"type": "string", "pattern": WORKFLOW_KEY_PATTERN.pattern},
                    "maxItems": WORKFLOW_JOBS_MAX,
                    "default": [],
                    "description": "the keys of its parents: it starts once all of them "
                    "have SUCCEEDED (WAITING until then)",
                },
                **job_fields,
            },
            "required": ["key", "type"],
            "additionalProperties": False,
        },
        "Workflow": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": ULID_PATTERN},
                "name": {"type": "string", "nullable": True},
                "created_at": dict(_DATE_TIME),
                "state": {
                    "type": "string",
                    "enum": ["RUNNING", "SUCCEEDED", "FAILED"],
                    "description": "SUCCEEDED when every job did; FAILED when every job "
                    "has finished and one did not succeed; RUNNING before",
                },
                "counts": {
                    "type": "object",
                    "additionalProperties": {"type": "integer", "minimum": 1},
                    "description": "its jobs by state (states with none left out)",
                },
                "jobs": {"type": "array", "items": _ref("Job")},
                "edges": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "from": {"type": "string", "description": "the parent's key"},
                            "to": {"type": "string", "description": "the child's key"},
                        },
                        "required": ["from", "to"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["id", "name", "created_at", "state", "counts", "jobs", "edges"],
            "additionalProperties": False,
        },
    }


def _schedule_schemas() -> dict[str, Schema]:
    new_job = new_job_schema()
    template = {
        "type": "object",
        "description": "the job each tick creates: the fields of a create but run_at (a "
        "tick's job is due when it fires) and idempotency_key (the tick is its key)",
        "properties": {k: v for k, v in new_job["properties"].items() if k in TEMPLATE_FIELDS},
        "required": ["type"],
        "additionalProperties": False,
    }
    fields: dict[str, Schema] = {
        "cron": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_EXPRESSION_CHARS,
            "description": "five fields (minute hour day month weekday), or six with "
            "seconds first; an expression that never fires is refused",
        },
        "timezone": {
            "type": "string",
            "default": SCHEDULE_DEFAULTS["timezone"],
            "description": "an IANA time zone name; ticks are computed in it",
        },
        "job": template,
        "missed": {
            "type": "string",
            "enum": list(MISSED),
            "default": SCHEDULE_DEFAULTS["missed"],
            "description": "ticks found later than catch_up_seconds: skip (no job) or "
            "run_once (one job, for the latest of them)",
        },
        "catch_up_seconds": {
            **_range(CATCH_UP_RANGE),
            "default": SCHEDULE_DEFAULTS["catch_up_seconds"],
            "description": "how late a tick may still fire with its own job",
        },
        "overlap": {
            "type": "string",
            "enum": list(OVERLAP),
            "default": SCHEDULE_DEFAULTS["overlap"],
            "description": "skip: no job for a tick while the previous tick's job is unfinished",
        },
        "paused": {
            "type": "boolean",
            "default": SCHEDULE_DEFAULTS["paused"],
            "description": "a paused schedule fires nothing; resumed, it fires from its "
            "next tick after now",
        },
    }
    name = {"type": "string", "pattern": SCHEDULE_NAME_PATTERN.pattern}
    shown = {
        **{
            k: {key: v for key, v in schema.items() if key != "default"}
            for k, schema in fields.items()
        },
        "name": name,
        "job": {**template, "required": sorted(TEMPLATE_FIELDS)},
        "next_tick_at": {**_DATE_TIME, "nullable": True, "description": "null while paused"},
        "last_tick_at": {**_DATE_TIME, "nullable": True},
        "last_job_id": {"type": "string", "nullable": True, "pattern": ULID_PATTERN},
        "created_at": dict(_DATE_TIME),
        "updated_at": dict(_DATE_TIME),
        "next_runs": {
            "type": "array",
            "items": dict(_DATE_TIME),
            "maxItems": NEXT_RUNS,
            "description": "the next ticks; empty while paused",
        },
    }
    return {
        "NewSchedule": {
            "type": "object",
            "properties": {"name": name, **fields},
            "required": ["name", "cron", "job"],
            "additionalProperties": False,
        },
        "SchedulePatch": {
            "type": "object",
            "description": "any of the fields of a schedule but its name",
            "properties": fields,
            "additionalProperties": False,
        },
        "Schedule": {
            "type": "object",
            "properties": shown,
            "required": list(shown),
            "additionalProperties": False,
        },
        "ScheduleList": {
            "type": "object",
            "properties": {
                "schedules": {"type": "array", "items": _ref("Schedule"), "description": "by name"}
            },
            "required": ["schedules"],
            "additionalProperties": False,
        },
    }


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


# What any route that reads a JSON body may answer before it looks at the body.
_BODY_ERRORS = {
    "413": _error("the body is larger than API_MAX_BODY_BYTES"),
    "415": _error("Content-Type is not application/json"),
}
# A rate limit's fields, as every schema of one writes them.
_RATE_LIMIT_NAME = {"type": "string", "pattern": RATE_LIMIT_PATTERN.pattern}
_PER_SECOND = {"type": "number", "minimum": PER_SECOND_MIN, "maximum": PER_SECOND_MAX}
_BURST = {"type": "integer", "minimum": BURST_RANGE[0], "maximum": BURST_RANGE[1]}
_UNKNOWN_RATE_LIMIT = _error("a job names a rate limit that does not exist; nothing was created")
_UNAVAILABLE = _error("the database is unavailable and nothing was written; retry (Retry-After: 1)")


_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_UNAUTHORIZED: Schema = {
    **_error("no API key, or a malformed, unknown, revoked or expired one"),
    "headers": {
        "WWW-Authenticate": {
            "description": 'Bearer realm="orchestrix" (with error="invalid_token" for a bad key)',
            "required": True,
            "schema": {"type": "string"},
        }
    },
}
_TOO_MANY: Schema = {
    **_error(
        "the key is over its requests/s (or, creating jobs, its jobs/s), or this client "
        "address failed authentication too often"
    ),
    "headers": _RETRY_AFTER,
}
_BEARER: dict[str, list[str]] = {"bearer": []}


def _secured(paths: dict[str, Schema], auth: AuthSettings) -> dict[str, Schema]:
    """Each operation with the key it needs on this server (services.api.auth:
    ROUTE_SCOPES and the settings) and the 401, 403 and 429 that come with one.

    With API_AUTH=off no operation needs a key, and the document says so: a
    client (or schemathesis) must not expect a 401 there.
    """
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            scope = ROUTE_SCOPES[(method.upper(), path)]
            operation["x-required-scope"] = scope
            needed = scope_of(method.upper(), path, auth) if auth.enabled else OPEN
            if needed is OPEN:
                operation["security"] = []
                continue
            operation["security"] = [_BEARER]
            responses = operation["responses"]
            responses["401"] = _UNAUTHORIZED
            responses["403"] = _error(f"the key lacks the scope {needed}")
            responses["429"] = _TOO_MANY
            note = f"Needs an API key with the scope {needed}" + (
                "." if needed == ADMIN else " (or admin)."
            )
            summary = operation.get("description")
            operation["description"] = f"{summary}\n\n{note}" if summary else note
    return paths


def _paths(max_body_bytes: int, list_max_bytes: int) -> dict[str, Schema]:
    job_id = {
        "name": "id",
        "in": "path",
        "required": True,
        # The pattern keeps /api/v1/jobs/cancel and /retry (the bulk actions) out.
        "schema": {"type": "string", "pattern": ULID_PATTERN},
        "description": "the job's id (a ULID); any other value is 404, or 405 where it names "
        "another route",
    }
    queue_name = {
        "name": "queue",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": QUEUE_PATTERN.pattern},
        "description": "the queue's name; any other value is 400",
    }
    schedule_name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": SCHEDULE_NAME_PATTERN.pattern},
        "description": "the schedule's name; any other value is 400",
    }
    rate_limit_name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": dict(_RATE_LIMIT_NAME),
        "description": "the rate limit's name; any other value is 400",
    }
    low, high = LIMIT_RANGE

    def name_filter(name: str, pattern: str) -> Schema:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "string", "pattern": _or_empty(pattern)},
            "description": f"exact {name}; an empty value means no filter",
        }

    return {
        "/api/v1/jobs": {
            "post": {
                "operationId": "createJob",
                "summary": "Create a job",
                "requestBody": {
                    "description": f"at most {max_body_bytes} bytes (API_MAX_BODY_BYTES, "
                    f"default {ApiSettings.max_body_bytes}), application/json only",
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewJob")}},
                },
                "responses": {
                    "200": _json(_ref("Job"), "a job with this idempotency_key exists: that job"),
                    "201": _json(_ref("Job"), "created"),
                    "400": _error("invalid JSON, not an object, unknown field, bad value"),
                    "422": _UNKNOWN_RATE_LIMIT,
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "List jobs, newest first, with filters and cursor pagination",
                "description": f"A page holds at most limit jobs and at most {list_max_bytes} "
                f"bytes of body on this server (API_LIST_MAX_BYTES, default "
                f"{ApiSettings.list_max_bytes}): it ends before the job that would take it "
                "past that, so it may hold fewer than limit jobs with a next_cursor; only a "
                "page of one job can be larger (one job is at most a payload of "
                "API_MAX_BODY_BYTES, a result of 1 MiB, 100 error texts and a progress "
                f"report of 64 KiB). {', '.join(LARGE_FIELDS)} are left out unless named in "
                "include. Every filter, alone or with others, walks an index newest first.",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "pattern": _or_empty(STATE_ANY_CASE_PATTERN),
                        },
                        "description": "one of "
                        + ", ".join(s.value for s in JobState)
                        + ", in any letter case; an empty value means no filter",
                    },
                    name_filter("type", TYPE_PATTERN.pattern),
                    name_filter("queue", QUEUE_PATTERN.pattern),
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "anyOf": [
                                {"type": "integer", "minimum": low, "maximum": high},
                                {"type": "string", "maxLength": 0},
                            ]
                        },
                        "description": f"page size, {low} to {high}, default {DEFAULT_LIMIT} "
                        "(also when empty)",
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": _or_empty(ULID_PATTERN)},
                        "description": "next_cursor of the previous page; an empty value means "
                        "the first page",
                    },
                    {
                        "name": "include",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": INCLUDE_PATTERN.pattern},
                        "description": "the large fields to show, comma-separated: any of "
                        + ", ".join(LARGE_FIELDS)
                        + "; left out (the keys absent) by default or when empty",
                    },
                ],
                "responses": {
                    "200": _json(_ref("JobList"), "a page of jobs"),
                    "400": _error("an invalid or unknown query parameter"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/batch": {
            "post": {
                "operationId": "createJobs",
                "summary": f"Create 1 to {BATCH_MAX} jobs in one request: all or none",
                "requestBody": {
                    "description": f"at most {max_body_bytes} bytes (API_MAX_BODY_BYTES), "
                    "application/json only",
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewJobBatch")}},
                },
                "responses": {
                    "201": _json(_ref("JobBatch"), "every job, created or found by its key"),
                    "400": _error("a bad batch, or a bad job: the message names it, jobs[i]"),
                    "422": _UNKNOWN_RATE_LIMIT,
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/cancel": {
            "post": {
                "operationId": "cancelJobs",
                "summary": "Cancel every job a selection matches",
                "description": "Waiting jobs (PENDING, RETRYING) are CANCELLED at once; for "
                "running ones their workers are asked, as for DELETE on one job. Finished "
                "jobs are left alone.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CancelSelection")}},
                },
                "responses": {
                    "200": _json(_ref("BulkCancelled"), "how many jobs were changed"),
                    "400": _error("no selection, an unknown field or a bad value"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/retry": {
            "post": {
                "operationId": "retryJobs",
                "summary": "Retry every FAILED or CANCELLED job a selection matches",
                "description": "Each becomes PENDING with a new budget of attempts, as with "
                "POST /api/v1/jobs/{id}/retry; jobs in other states are left alone.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RetrySelection")}},
                },
                "responses": {
                    "200": _json(_ref("BulkRetried"), "how many jobs were changed"),
                    "400": _error("no selection, an unknown field or a bad value"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/{id}": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJob",
                "summary": "Get one job",
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": f"^{WAIT_PATTERN.pattern}$"},
                        "description": "answer once the job has finished (SUCCEEDED, FAILED "
                        "or CANCELLED), or after this long with its state then: seconds "
                        f"(30), or 500ms, 30s; a longer wait than {WAIT_MAX_S:g}s waits "
                        f"{WAIT_MAX_S:g}s",
                    }
                ],
                "responses": {
                    "200": _json(_ref("Job"), "the job"),
                    "400": _error("a bad wait"),
                    "404": _error("no job has that id"),
                    "405": _error(
                        "the id is batch, cancel or retry: resources of their own, POST only"
                    ),
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a job",
                "description": "A job that has not started (PENDING, RETRYING) is "
                "CANCELLED at once: 200. For a RUNNING job, cancellation is requested of its "
                "worker: 202.",
                "responses": {
                    "200": _json(_ref("Job"), "the job, now CANCELLED"),
                    "202": _json(_ref("Job"), "the job is RUNNING; its cancellation is requested"),
                    "404": _error("no job has that id"),
                    "405": _error(
                        "the id is batch, cancel or retry: resources of their own, POST only"
                    ),
                    "409": _error("the job has finished, or changed state during the cancel"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/{id}/events": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJobEvents",
                "summary": "Every state change of a job, oldest first: from, to, attempt, "
                "when and by whom",
                "responses": {
                    "200": _json(_ref("EventList"), "the job's events"),
                    "404": _error("no job has that id"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/events": {
            "get": {
                "operationId": "streamEvents",
                "summary": "A live stream of state changes (Server-Sent Events)",
                "description": "Each event is `id: <event id>` and `data: <Event as JSON>`, "
                "sent once its transaction and every older one have ended. Reconnect with "
                "the Last-Event-ID header (or ?last_event_id=) to resume right after that "
                "event, with no gap and no repeat, for as long as the events are kept. A "
                "quiet stream sends a `: heartbeat` comment every API_EVENTS_HEARTBEAT "
                f"(default {ApiSettings.events_heartbeat_s:g}s). Filters combine (all must "
                "match).",
                "parameters": [
                    {
                        "name": "job_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": ULID_PATTERN},
                        "description": "only this job's events",
                    },
                    {
                        "name": "workflow_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": ULID_PATTERN},
                        "description": "only this workflow's jobs",
                    },
                    {
                        "name": "queue",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": QUEUE_PATTERN.pattern},
                        "description": "only jobs of this queue",
                    },
                    {
                        "name": "type",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": TYPE_PATTERN.pattern},
                        "description": "only jobs of this type",
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": _or_empty(EVENT_ID_PATTERN)},
                        "description": "resume after this event (the Last-Event-ID header "
                        "wins when both are given); without it, the stream starts now",
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": _or_empty(EVENT_ID_PATTERN)},
                        "description": "resume after this event",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the stream, open until the client or the server ends it",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": _error("an unknown or bad query parameter, or a bad Last-Event-ID"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/{id}/retry": {
            "parameters": [job_id],
            "post": {
                "operationId": "retryJob",
                "summary": "Run a FAILED or CANCELLED job again",
                "description": "It becomes PENDING, due now, with a new budget of "
                "max_attempts attempts (attempt starts again from 0); its errors stay.",
                "responses": {
                    "200": _json(_ref("Job"), "the job, PENDING again"),
                    "404": _error("no job has that id"),
                    "409": _error("the job is not FAILED or CANCELLED; the message says its state"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/jobs/{id}/run": {
            "parameters": [job_id],
            "post": {
                "operationId": "runJobNow",
                "summary": "Make a job waiting for a later run_at due now",
                "description": "A PENDING or RETRYING job whose run_at is ahead becomes "
                "due at once and the workers are woken; one already due is left as it is.",
                "responses": {
                    "200": _json(_ref("Job"), "the job, due now"),
                    "404": _error("no job has that id"),
                    "409": _error("the job is RUNNING or finished"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/stats": {
            "get": {
                "operationId": "stats",
                "summary": "Count jobs by state (every state is listed), workers, and jobs "
                "waiting for an executor",
                "description": "Exact counts, read from counts kept per (queue, type, state), "
                "not from the jobs: milliseconds whatever the number of jobs.",
                "responses": {
                    "200": _json(_ref("Stats"), "the counts"),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/api/v1/queues": {
            "get": {
                "operationId": "listQueues",
                "summary": "List the queues: counts by state, the oldest due job, paused or not",
                "responses": {
                    "200": _json(_ref("QueueList"), "every queue, by name"),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/api/v1/queues/{queue}": {
            "parameters": [queue_name],
            "get": {
                "operationId": "getQueue",
                "summary": "Get one queue",
                "responses": {
                    "200": _json(_ref("Queue"), "the queue"),
                    "400": _error("the name is not a valid queue name"),
                    "404": _error("no job names the queue and it was never paused"),
                    "503": _UNAVAILABLE,
                },
            },
            "patch": {
                "operationId": "changeQueue",
                "summary": "Set how many jobs of the queue, and of one of its concurrency "
                "keys, run at once",
                "description": "Either limit or both; the one not named stays. A limit holds "
                "fleet-wide from the next claim on; jobs running above a lowered limit "
                "finish. A queue that has no jobs yet can be given one.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "key_limit": {
                                        "type": "integer",
                                        "nullable": True,
                                        "minimum": KEY_LIMIT_RANGE[0],
                                        "maximum": KEY_LIMIT_RANGE[1],
                                        "description": "null: back to the default, 1",
                                    },
                                    "running_limit": {
                                        "type": "integer",
                                        "nullable": True,
                                        "minimum": RUNNING_LIMIT_RANGE[0],
                                        "maximum": RUNNING_LIMIT_RANGE[1],
                                        "description": "null: no limit",
                                    },
                                },
                                "minProperties": 1,
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Queue"), "the queue, with its limit"),
                    "400": _error("a bad name or body"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/queues/{queue}/pause": {
            "parameters": [queue_name],
            "post": {
                "operationId": "pauseQueue",
                "summary": "Pause a queue: no worker claims its jobs from its next claim on",
                "description": "The jobs already running finish; new jobs can still be "
                "created and wait. A queue with no jobs yet can be paused. Pausing a paused "
                "queue changes nothing.",
                "responses": {
                    "200": _json(_ref("Queue"), "the queue, paused"),
                    "400": _error("the name is not a valid queue name"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/rate-limits": {
            "get": {
                "operationId": "listRateLimits",
                "summary": "List the rate limits, by name",
                "responses": {
                    "200": _json(_ref("RateLimitList"), "every rate limit"),
                    "503": _UNAVAILABLE,
                },
            },
            "post": {
                "operationId": "createRateLimit",
                "summary": "Create a rate limit: a token bucket that jobs' starts take from",
                "description": "Jobs name it in rate_limit; each start of such a job, on any "
                "worker, takes a token. A new bucket starts full.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewRateLimit")}},
                },
                "responses": {
                    "201": _json(_ref("RateLimit"), "created"),
                    "400": _error("a bad body"),
                    "409": _error("a rate limit of that name exists"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/rate-limits/{name}": {
            "parameters": [rate_limit_name],
            "get": {
                "operationId": "getRateLimit",
                "summary": "Get one rate limit, with the tokens it holds now",
                "responses": {
                    "200": _json(_ref("RateLimit"), "the rate limit"),
                    "400": _error("the name is not a valid rate limit name"),
                    "404": _error("no such rate limit"),
                    "503": _UNAVAILABLE,
                },
            },
            "patch": {
                "operationId": "changeRateLimit",
                "summary": "Change a rate limit's rate, burst or both",
                "description": "The bucket is brought up to now at the old rate, then "
                "capped at the new burst; the next start fleet-wide sees the new figures.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RateLimitChange")}},
                },
                "responses": {
                    "200": _json(_ref("RateLimit"), "the rate limit, changed"),
                    "400": _error("a bad name or body"),
                    "404": _error("no such rate limit"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "deleteRateLimit",
                "summary": "Delete a rate limit no unfinished job names",
                "responses": {
                    "200": _json(_ref("RateLimit"), "the rate limit, deleted"),
                    "400": _error("the name is not a valid rate limit name"),
                    "404": _error("no such rate limit"),
                    "409": _error("unfinished jobs name it: the message says how many"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/queues/{queue}/resume": {
            "parameters": [queue_name],
            "post": {
                "operationId": "resumeQueue",
                "summary": "Resume a paused queue: its due jobs start at once",
                "description": "Resuming a queue that is not paused changes nothing.",
                "responses": {
                    "200": _json(_ref("Queue"), "the queue, not paused"),
                    "400": _error("the name is not a valid queue name"),
                    "404": _error("no job names the queue and it was never paused"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/workflows": {
            "post": {
                "operationId": "createWorkflow",
                "summary": f"Create a workflow: 1 to {WORKFLOW_JOBS_MAX} jobs and their "
                "dependencies, all or none",
                "description": "A job with parents waits (WAITING) until all of them have "
                "SUCCEEDED, then becomes PENDING at once. A job that ends FAILED or CANCELLED "
                "has its waiting descendants CANCELLED, naming it; retrying it (POST "
                "/api/v1/jobs/{id}/retry) runs it again and brings them back.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewWorkflow")}},
                },
                "responses": {
                    "201": _json(_ref("Workflow"), "created, with every job"),
                    "400": _error("a bad body or job, a repeated or unknown key, or a cycle"),
                    "422": _UNKNOWN_RATE_LIMIT,
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/workflows/{id}": {
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": ULID_PATTERN},
                    "description": "the workflow's id (a ULID); any other value is 404",
                }
            ],
            "get": {
                "operationId": "getWorkflow",
                "summary": "A workflow: every job with its state, and the edges",
                "responses": {
                    "200": _json(_ref("Workflow"), "the workflow"),
                    "404": _error("no workflow has that id (or retention deleted all its jobs)"),
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "cancelWorkflow",
                "summary": "Cancel every job of the workflow that has not finished",
                "description": "Waiting jobs (WAITING, PENDING, RETRYING) are CANCELLED at "
                "once; for running ones their workers are asked.",
                "responses": {
                    "200": _json(_ref("BulkCancelled"), "how many jobs were changed"),
                    "404": _error("no workflow has that id (or retention deleted all its jobs)"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/schedules": {
            "post": {
                "operationId": "createSchedule",
                "summary": "Create a cron schedule",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewSchedule")}},
                },
                "responses": {
                    "201": _json(_ref("Schedule"), "created"),
                    "400": _error("a bad field: the message names it"),
                    "409": _error("a schedule of that name exists"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
            "get": {
                "operationId": "listSchedules",
                "summary": "List the cron schedules",
                "responses": {
                    "200": _json(_ref("ScheduleList"), "every schedule, by name"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/api/v1/schedules/{name}": {
            "parameters": [schedule_name],
            "get": {
                "operationId": "getSchedule",
                "summary": "Get one schedule, with its next runs",
                "responses": {
                    "200": _json(_ref("Schedule"), "the schedule"),
                    "400": _error("the name is not a valid schedule name"),
                    "404": _error("no schedule has that name"),
                    "503": _UNAVAILABLE,
                },
            },
            "patch": {
                "operationId": "changeSchedule",
                "summary": "Change any field of a schedule but its name",
                "description": "A change of cron, timezone or paused computes the next tick "
                "from now.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SchedulePatch")}},
                },
                "responses": {
                    "200": _json(_ref("Schedule"), "the schedule as changed"),
                    "400": _error("a bad field: the message names it"),
                    "404": _error("no schedule has that name"),
                    **_BODY_ERRORS,
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "deleteSchedule",
                "summary": "Delete a schedule; the jobs it created stay",
                "responses": {
                    "200": _json(_ref("Schedule"), "the schedule as it was"),
                    "400": _error("the name is not a valid schedule name"),
                    "404": _error("no schedule has that name"),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness: the process is up",
                "responses": {"200": _json(_ref("Health"), "up")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: PostgreSQL answers and not shutting down (NATS is reported)",
                "responses": {
                    "200": _json(_ref("Ready"), "ready, or degraded while NATS is away"),
                    "503": _json(
                        _ref("Ready"), "PostgreSQL is away or shutting down; error names why"
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        DOCUMENT_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": _json({"type": "object"}, "the OpenAPI document"),
                },
            }
        },
    }


# The document of an API with the default settings: authentication on.
DEFAULT_AUTH = AuthSettings()


def _auth_text(auth: AuthSettings) -> str:
    if not auth.enabled:
        return (
            "Authentication is off on this server (API_AUTH=off): no operation needs a "
            "key. With it on, each operation needs an API key (Authorization: Bearer "
            "<key>) with the scope its x-required-scope names."
        )
    return (
        "Authentication: each operation with a security requirement needs an API key "
        "(Authorization: Bearer <key>, made by `orchestrix keys create`) with the scope "
        "its x-required-scope names (admin may do everything); without one, 401; with a "
        "key that lacks the scope, 403; over the key's limits, or after too many failed "
        "authentications from one address, 429 with Retry-After. /ready and /metrics "
        "are open unless API_READY_AUTH / API_METRICS_AUTH are on."
    )


def build_document(
    max_body_bytes: int = ApiSettings.max_body_bytes,
    list_max_bytes: int = ApiSettings.list_max_bytes,
    auth: AuthSettings = DEFAULT_AUTH,
) -> dict[str, Any]:
    """The whole OpenAPI document, for a server whose body limit is ``max_body_bytes``,
    whose pages of jobs end at ``list_max_bytes`` and that asks for keys as ``auth``
    says."""
    limits = "\n".join(
        f"- {line}"
        for line in (
            f"request body: at most {max_body_bytes} bytes on this server "
            f"(API_MAX_BODY_BYTES, default {ApiSettings.max_body_bytes}); larger is 413",
            "request body: application/json only; anything else is 415",
            f"type: {TYPE_PATTERN.pattern}",
            f"queue: {QUEUE_PATTERN.pattern}",
            "priority: {} to {}".format(*PRIORITY_RANGE),
            "max_attempts: {} to {}".format(*MAX_ATTEMPTS_RANGE),
            "timeout_seconds: {} to {}".format(*TIMEOUT_SECONDS_RANGE),
            f"idempotency_key: 1 to {IDEMPOTENCY_KEY_MAX} characters, no control characters",
            "payload: a JSON object without U+0000",
            "limit: {} to {}, default {}".format(*LIMIT_RANGE, DEFAULT_LIMIT),
            f"a page of jobs: at most {list_max_bytes} bytes on this server "
            f"(API_LIST_MAX_BYTES, default {ApiSettings.list_max_bytes}) unless it holds one "
            f"job; {', '.join(LARGE_FIELDS)} only with ?include=",
        )
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Orchestrix API",
            "version": "1",
            "description": "Create jobs, read them back, cancel them; pause and resume "
            "queues; create jobs on cron schedules.\n\n"
            'Every error answers JSON {"error": "..."}. An unknown path is 404, a method '
            "not allowed on a path is 405 with an Allow header, and an unexpected failure "
            "is 500.\n\n" + _auth_text(auth) + "\n\nLimits:\n" + limits,
        },
        "paths": _secured(_paths(max_body_bytes, list_max_bytes), auth),
        "security": [_BEARER] if auth.enabled else [],
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key made by `orchestrix keys create`: "
                    "`Authorization: Bearer orx_...`. Not needed when the API runs with "
                    "API_AUTH=off (as `orchestrix dev` does).",
                }
            },
        },
    }


@functools.cache
def _serialized(max_body_bytes: int, list_max_bytes: int, auth: AuthSettings) -> bytes:
    return orjson.dumps(build_document(max_body_bytes, list_max_bytes, auth))


@routes.get(DOCUMENT_PATH)
async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI document of this API, built once per body and page limit and
    authentication settings."""
    body = _serialized(request.app[MAX_BODY], request.app[LIST_MAX_BYTES], request.app[AUTH])
    return web.Response(body=body, content_type="application/json")
