"""Schemathesis fuzzes the real API process against the document it serves at /openapi.json.

The API runs as its own process (``orchestrix api``) on this run's database, and
the schema is loaded from its live ``/openapi.json``, so what is checked is what
the API says about itself. For every documented operation schemathesis sends its
coverage cases (each limit's boundary values on both sides, missing and extra
fields, wrong types, undocumented methods) and ``MAX_EXAMPLES`` generated
requests, valid and invalid ones. Every answer must not be a 5xx and must conform
to the document: a documented status code, the documented content type, a body
that matches the schema. Valid requests must be accepted and invalid ones
refused. The test prints how many cases it sent.

It runs twice: against an API with auth off, and against one with auth on that
every request reaches with an admin key (fewer generated cases: the point is
that the answers, the 401s of requests without the key among them, match the
document there too).

Generation is derandomized with a fixed seed, so the same command sends the same
requests. Hypothesis also draws from constants it finds in the modules loaded at
the time, so this file run alone and the whole suite send different (each
reproducible) requests.

Schemathesis's own pytest integration (``schema.parametrize()``) does not work
with pytest 9.2 (it sets ``Node._nodeid``, which pytest 9.2 no longer has), so
each operation's test is built with the same builder that integration uses and
is run here, one operation after another.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
from orchestrix.db import api_keys
from schemathesis import Case
from schemathesis.config import ProjectConfig
from schemathesis.core.result import Ok
from schemathesis.generation import derive_operation_seed
from schemathesis.generation.hypothesis.builder import (
    HypothesisTestConfig,
    HypothesisTestMode,
    create_test,
)
from schemathesis.schemas import APIOperation

from tests.conftest import RUN_ID, Servers
from tests.e2e.harness import System

# About 7,000 cases with auth off: about 70 s here against local servers, more
# against embedded ones on a loaded machine (a timeout inside an operation reads
# as its failure). The coverage phase sends every boundary case whatever the
# number of generated ones.
pytestmark = pytest.mark.timeout(480)

SEED = 20240601
MAX_EXAMPLES = 200  # per operation, in the fuzzing phase; examples and coverage add their own
MAX_EXAMPLES_AUTH = 50  # the same, in the run with auth on
# Every answer: no 5xx, documented status, content type, headers and body; valid
# requests accepted, invalid ones refused; undocumented methods answered 405.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
)
STREAM = "GET /api/v1/events"
MODES = [HypothesisTestMode.EXAMPLES, HypothesisTestMode.COVERAGE, HypothesisTestMode.FUZZING]


@dataclass
class Tally:
    """What the fuzzer sent, by operation, and what failed."""

    cases: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def count(self, case: Case[Any]) -> None:
        label = case.operation.label
        self.cases[label] = self.cases.get(label, 0) + 1


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    max_examples: int
    checks: tuple[str, ...]
    key_name: str | None = None  # the admin key's, with auth on


@pytest.fixture(scope="module", params=["auth-off", "auth-on"])
async def target(
    request: pytest.FixtureRequest,
    database: str,
    servers: Servers,
    session_pool: asyncpg.Pool,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Target]:
    """A real API process, on an empty jobs table so that every run sees the same data."""
    await session_pool.execute(
        "TRUNCATE jobs, job_events, job_dependencies, workflows, job_counts, job_count_deltas"
    )
    auth_on = request.param == "auth-on"
    env: dict[str, str] = {}
    headers: dict[str, str] = {}
    key_name = f"fuzz-admin-{RUN_ID}"
    if auth_on:
        # Unlimited, and no failure budget to run out of: a 429 would fail the
        # acceptance of valid requests.
        env = {"API_AUTH": "on", "API_AUTH_FAILURES": "1000000"}
        _, token = await api_keys.create(
            session_pool,
            key_name,
            ["admin"],
            limits=api_keys.KeyLimits(requests_per_s=0, jobs_per_s=0),
        )
        headers = {"Authorization": f"Bearer {token}"}
    system = System(database, servers.nats_url, tmp_path_factory.mktemp("fuzz"), env=env)
    api = system.start("api")
    try:
        await system.ready(api)
        yield Target(
            f"http://127.0.0.1:{api.port}",
            headers,
            MAX_EXAMPLES_AUTH if auth_on else MAX_EXAMPLES,
            # With auth on, also: a request without the key is refused.
            (*CHECKS, "ignored_auth") if auth_on else CHECKS,
            key_name if auth_on else None,
        )
    finally:
        system.stop_all()
    log = api.log()
    assert "unhandled error" not in log, log[-5000:]


def fuzz(
    operation: APIOperation[Any, Any, Any, Any], config: ProjectConfig, session: requests.Session
) -> Tally:
    tally = Tally()

    def check(case: Case[Any]) -> None:
        tally.count(case)
        case.call_and_validate(session=session)

    test = create_test(
        operation=operation,
        test_func=check,
        config=HypothesisTestConfig(
            project=config,
            modes=MODES,
            settings=config.get_hypothesis_settings(operation=operation, phase="fuzzing"),
            seed=derive_operation_seed(config.seed, operation.label),
        ),
    )
    try:
        test()
    except (Exception, BaseExceptionGroup) as exc:  # already shrunk; all are reported at the end
        # With every sub-exception of a group (a flaky replay hides the real one).
        tally.failures.append(f"{operation.label}:\n{''.join(traceback.format_exception(exc))}")
    return tally


def test_api_answers_as_its_document_says(
    target: Target,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    api_url = target.url
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": api_url,
            "headers": target.headers,
            "generation": {
                "mode": "all",  # valid requests and invalid ones
                "max-examples": target.max_examples,
                "deterministic": True,
                # The API refuses U+0000 anywhere in a payload (jsonb cannot hold it). The
                # document says so in words, as OAS 3.0 has no way to say it of the keys and
                # strings at every depth of an object, so valid requests never carry it.
                # tests/integration/test_api.py checks the refusal.
                "allow-x00": False,
                "database": "none",
            },
            "checks": {name: {"enabled": True} for name in target.checks},
            # A cron expression's meaning (ranges per field, an expression that never
            # fires) and the set of IANA zone names are more than a JSON schema says:
            # a schema-valid schedule may be refused. So is a workflow whose keys
            # repeat, whose depends_on names no job's key, or whose graph has a cycle.
            # Every other check still runs on these operations;
            # tests/integration/test_schedules.py and test_workflows.py check that
            # valid ones are accepted.
            "operations": [
                {
                    "include-operation-id": [
                        "createSchedule",
                        "changeSchedule",
                        "createWorkflow",
                    ],
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                },
                # A job may name a rate limit, which must exist (422 otherwise): the
                # schema gives its name's form, not the names that exist.
                # tests/integration/test_limits.py checks both answers.
                {
                    "include-operation-id": ["createJob", "createJobs"],
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [
                                "2XX",
                                "3XX",
                                "401",
                                "403",
                                "404",
                                "409",
                                "422",
                                "429",
                                "5XX",
                            ]
                        }
                    },
                },
            ],
            "request-timeout": 10,
        }
    )
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json", config=config)
    project = schema.config
    # The event stream stays open until the client leaves: every request to it would
    # time out. tests/integration/test_events.py checks its answers and its errors.
    operations = [
        operation
        for result in schema.get_all_operations()
        if isinstance(result, Ok) and (operation := result.ok()).label != STREAM
    ]
    documented = {
        f"{method.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for method in item
        if method != "parameters"
    }
    # Schemathesis leaves out the operation that serves the document itself.
    assert {operation.label for operation in operations} == documented - {
        "GET /openapi.json",
        STREAM,
    }

    started = time.monotonic()
    results = []
    with requests.Session() as session:
        for operation in operations:
            results.append(fuzz(operation, project, session))
        elapsed = time.monotonic() - started
        if target.key_name is not None:
            # Schemathesis counts 401 as an acceptable answer to a valid request: that
            # the key did get through shows in the jobs it created.
            listed = session.get(f"{api_url}/api/v1/jobs?limit=1000", headers=target.headers)
            assert listed.status_code == 200, listed.text
            creators = {job["created_by_key"] for job in listed.json()["jobs"]}
            assert creators == {target.key_name}

    cases = {label: n for result in results for label, n in result.cases.items()}
    total = sum(cases.values())
    per_operation = ", ".join(f"{label} {n}" for label, n in cases.items())
    # The issue asks for the fuzzer's case count: on the terminal and in JUnit XML.
    record_property("fuzz_cases", total)
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases in {elapsed:.1f} s ({per_operation})")
    failures = [failure for result in results for failure in result.failures]
    assert failures == [], "\n\n".join(failures)
    # The four operations with inputs draw max_examples each.
    assert total >= target.max_examples * 4
