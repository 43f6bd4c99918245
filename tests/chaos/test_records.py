"""The chaos suite's judgement of executions, on hand-made histories (no processes)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.chaos.records import JobRow, judge, parse

pytestmark = pytest.mark.chaos


def row(job_id: str, state: str = "SUCCEEDED", attempt: int = 1, **lost: float) -> JobRow:
    """A job row; ``lost={"a1": t}`` records attempt 1 as rescued (WorkerLost) at time t."""
    errors: list[dict[str, Any]] = [
        {
            "attempt": int(name[1:]),
            "error": "WorkerLost: the worker running this attempt stopped renewing its lease",
            "at": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        for name, at in lost.items()
    ]
    return JobRow(job_id, state, attempt, 10, errors[-1]["error"] if errors else None, errors)


def test_parse_pairs_each_start_with_the_end_of_the_same_process() -> None:
    parsed = parse(
        "START,J,1,10,100.0\n"
        "START,J,1,11,100.5\n"
        "END,J,1,11,101.0\n"
        "CANCEL,J,1,10,102.0\n"
        "END,K,1,10,103.0\n"
        "garbage\n"
    )
    first, second = parsed.executions
    assert (first.pid, first.ended, first.cancelled) == (10, 102.0, True)
    assert (second.pid, second.ended, second.finished) == (11, 101.0, True)
    assert parsed.bad_lines == ["END,K,1,10,103.0", "garbage"]


def test_a_killed_attempt_explains_one_extra_execution() -> None:
    parsed = parse("START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, {10: 101.0})
    assert verdict.duplicates == []
    assert [(e.reason, e.explained) for e in verdict.extras] == [("cut short by SIGKILL", True)]
    assert verdict.executions_per_job == {2: 1}
    assert verdict.cut_short_by_kill == 1


def test_the_same_attempt_running_twice_at_once_is_a_duplicate() -> None:
    # pid 10 never ends and was never killed: it may still be running.
    parsed = parse("START,J,1,10,100.0\nSTART,J,1,11,104.0\nEND,J,1,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J")}, {})
    assert len(verdict.duplicates) == 1
    assert [e.explained for e in verdict.extras] == [False]


def test_a_rerun_of_an_attempt_after_its_worker_died_is_no_duplicate() -> None:
    parsed = parse("START,J,1,10,100.0\nSTART,J,1,11,104.0\nEND,J,1,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J")}, {10: 101.0})
    assert verdict.duplicates == []
    assert [e.explained for e in verdict.extras] == [True]


def test_a_lease_declared_lost_while_the_worker_lived_is_not_explained() -> None:
    # The worker finished attempt 1 but could not write it; the rescuer took the job.
    parsed = parse("START,J,1,10,100.0\nEND,J,1,10,100.5\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, {})
    (extra,) = verdict.extras
    assert not extra.explained
    assert "while its live worker was still on it" in extra.reason
    # Killing the worker only after the rescue does not explain it either.
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, {10: 106.0})
    assert not verdict.extras[0].explained


def test_attempts_of_one_job_overlapping_in_time_are_reported() -> None:
    parsed = parse(
        "START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\nCANCEL,J,1,10,106.0\n"
    )
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, {})
    assert verdict.duplicates == []
    assert len(verdict.overlapping_attempts) == 1
    assert "dropped it (CANCEL)" in verdict.extras[0].reason


def test_success_needs_a_finished_execution_of_the_last_attempt() -> None:
    parsed = parse("START,J,1,10,100.0\n")
    verdict = judge(parsed.executions, {"J": row("J"), "K": row("K", "RUNNING")}, {10: 101.0})
    assert verdict.succeeded_unrun == ["J"]
    # A job that is not terminal is reported as lost, not judged here.
    assert verdict.executions_per_job == {1: 1, 0: 1}


def test_executions_of_jobs_nobody_submitted_are_strangers() -> None:
    parsed = parse("START,X,1,10,100.0\nEND,X,1,10,101.0\n")
    assert len(judge(parsed.executions, {}, {}).strangers) == 1
