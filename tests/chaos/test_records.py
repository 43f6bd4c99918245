"""The chaos suite's judgement of executions, on hand-made histories (no processes).

Each check of ``tests/chaos/records.py`` is shown passing on a history that
keeps it and failing on one that breaks it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.chaos.records import (
    CANCEL_HONOURED,
    FINAL_STATE,
    HISTORY,
    LIMITS,
    LOST_TO_SHUTDOWN_IN_OUTAGE,
    RETRIES,
    SHUTDOWN_FAILED,
    WORKFLOWS,
    CancelRequest,
    Faults,
    JobRow,
    Judgement,
    Limits,
    Verdict,
    Window,
    judge,
    parse,
)

pytestmark = pytest.mark.chaos

LOST = "WorkerLost: the worker running this attempt stopped renewing its lease"


def stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row(
    job_id: str,
    state: str = "SUCCEEDED",
    attempt: int = 1,
    *,
    errors: tuple[tuple[int, str, float], ...] = (),
    plan: str = "plain",
    fail_times: int = 0,
    max_attempts: int = 10,
    timeout_seconds: int = 300,
    handoffs: int = 0,
    **lost: float,
) -> JobRow:
    """A job row; ``lost={"a1": t}`` records attempt 1 as rescued (WorkerLost) at time t,
    ``errors`` any other entries as (attempt, error, time)."""
    entries: list[dict[str, Any]] = [
        {"attempt": int(name[1:]), "error": LOST, "at": stamp(at)} for name, at in lost.items()
    ]
    entries += [{"attempt": a, "error": text, "at": stamp(at)} for a, text, at in errors]
    entries.sort(key=lambda e: int(e["attempt"]))
    return JobRow(
        job_id,
        state,
        attempt,
        max_attempts,
        entries[-1]["error"] if entries else None,
        entries,
        payload={"plan": plan, "fail_times": fail_times},
        timeout_seconds=timeout_seconds,
        handoffs=handoffs,
    )


def fates(verdict: Verdict) -> list[tuple[int, str, Judgement]]:
    return [(f.attempt, f.reason, f.judgement) for f in verdict.fates]


def checks(verdict: Verdict) -> list[str]:
    return [p.check for p in verdict.job_problems]


def test_parse_pairs_each_start_with_the_end_of_the_same_process() -> None:
    parsed = parse(
        "START,J,1,10,100.0\n"
        "START,J,1,11,100.5\n"
        "END,J,1,11,101.0\n"
        "CANCEL,J,1,10,102.0\n"
        "START,J,2,10,103.0\n"
        "FAIL,J,2,10,103.5\n"
        "END,K,1,10,103.0\n"
        "garbage\n"
    )
    first, second, third = parsed.executions
    assert (first.pid, first.ended, first.cancelled) == (10, 102.0, True)
    assert (second.pid, second.ended, second.finished) == (11, 101.0, True)
    assert (third.ended, third.failed) == (103.5, True)
    assert parsed.bad_lines == ["END,K,1,10,103.0", "garbage"]


def test_a_killed_attempt_explains_one_extra_execution() -> None:
    parsed = parse("START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, Faults({10: 101.0}))
    assert verdict.duplicates == verdict.overlapping_attempts == []
    assert fates(verdict) == [
        (1, "cut short by SIGKILL", Judgement.EXPLAINED),
        (2, "the counted success", Judgement.EXPLAINED),
    ]
    assert verdict.executions_per_job == {2: 1}
    assert verdict.cut_short_by_kill == 1
    assert verdict.job_problems == []


def test_the_same_attempt_running_twice_at_once_is_a_duplicate() -> None:
    # pid 10 never ends and was never killed: it may still be running.
    parsed = parse("START,J,1,10,100.0\nSTART,J,1,11,104.0\nEND,J,1,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J")}, Faults())
    assert len(verdict.duplicates) == 1
    assert [f.judgement for f in verdict.fates] == [Judgement.UNEXPLAINED, Judgement.EXPLAINED]


def test_a_rerun_of_an_attempt_after_its_worker_died_is_no_duplicate_but_needs_a_count() -> None:
    parsed = parse("START,J,1,10,100.0\nSTART,J,1,11,104.0\nEND,J,1,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J")}, Faults({10: 101.0}))
    assert verdict.duplicates == []
    # A killed attempt is counted (WorkerLost): run again as the same attempt, it was not.
    ((_, reason, judgement), _) = fates(verdict)
    assert judgement is Judgement.UNEXPLAINED
    assert "no hand-back" in reason


def test_a_hand_back_gives_the_attempt_back_uncounted() -> None:
    parsed = parse(
        "START,J,1,10,100.0\nCANCEL,J,1,10,102.5\nSTART,J,1,11,103.0\nEND,J,1,11,104.0\n"
    )
    faults = Faults(terms={10: 100.5}, exits={10: 102.8})
    verdict = judge(parsed.executions, {"J": row("J", handoffs=1)}, faults)
    assert fates(verdict) == [
        (1, "handed back by its stopping worker", Judgement.EXPLAINED),
        (1, "the counted success", Judgement.EXPLAINED),
    ]
    assert verdict.job_problems == []
    # handoffs on the row must count the hand-back.
    assert checks(judge(parsed.executions, {"J": row("J", handoffs=0)}, faults)) == [RETRIES]
    # A CANCEL before the SIGTERM was no hand-back.
    early = Faults(terms={10: 102.6}, exits={10: 102.8})
    verdict = judge(parsed.executions, {"J": row("J", handoffs=1)}, early)
    assert verdict.fates[0].judgement is Judgement.UNEXPLAINED


def test_a_lease_declared_lost_while_the_worker_lived_is_not_explained() -> None:
    # The worker finished attempt 1 but could not write it; the rescuer took the job.
    parsed = parse("START,J,1,10,100.0\nEND,J,1,10,100.5\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, Faults())
    first = verdict.fates[0]
    assert first.judgement is Judgement.UNEXPLAINED
    assert "while PostgreSQL was fine" in first.reason
    # The same while PostgreSQL was away: the outcome's write waited, the lease ran out.
    away = Faults(windows=[Window(100.2, 102.5, "PostgreSQL stopped")])
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, away)
    assert verdict.fates[0].judgement is Judgement.EXPLAINED
    # Still running at the rescue, and killed only after it: not explained either.
    parsed = parse("START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n")
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, Faults({10: 106.0}))
    assert "while its live worker was still on it" in verdict.fates[0].reason
    assert verdict.fates[0].judgement is Judgement.UNEXPLAINED


def test_a_fence_is_explained_only_by_trouble_with_postgresql() -> None:
    parsed = parse(
        "START,J,1,10,100.0\nCANCEL,J,1,10,101.5\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n"
    )
    rows = {"J": row("J", attempt=2, a1=103.0)}
    fine = judge(parsed.executions, rows, Faults())
    assert fine.fates[0].judgement is Judgement.UNEXPLAINED
    cut = Faults(windows=[Window(100.2, 104.0, "cut off", pids=frozenset({10}))])
    assert judge(parsed.executions, rows, cut).fates[0].judgement is Judgement.EXPLAINED
    # Another worker's cut explains nothing.
    other = Faults(windows=[Window(100.2, 104.0, "cut off", pids=frozenset({12}))])
    assert judge(parsed.executions, rows, other).fates[0].judgement is Judgement.UNEXPLAINED


def test_attempts_of_one_job_overlapping_in_time_are_reported() -> None:
    parsed = parse(
        "START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\nCANCEL,J,1,10,106.0\n"
    )
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=103.0)}, Faults())
    assert verdict.duplicates == []
    assert len(verdict.overlapping_attempts) == 1


def test_a_sigkilled_execution_ends_at_the_kill() -> None:
    parsed = parse("START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n")
    rows = {"J": row("J", attempt=2, a1=103.0)}
    assert judge(parsed.executions, rows, Faults({10: 103.5})).overlapping_attempts == []
    assert len(judge(parsed.executions, rows, Faults({10: 104.5})).overlapping_attempts) == 1
    # Never killed, never ended: it may still run.
    assert len(judge(parsed.executions, rows, Faults()).overlapping_attempts) == 1


def test_success_needs_a_finished_execution_of_the_last_attempt() -> None:
    parsed = parse("START,J,1,10,100.0\n")
    rows = {"J": row("J"), "K": row("K", "RUNNING")}
    verdict = judge(parsed.executions, rows, Faults({10: 101.0}))
    assert verdict.succeeded_unrun == ["J"]
    # A job that is not terminal is reported as lost, not judged here.
    assert verdict.executions_per_job == {1: 1, 0: 1}


def test_executions_of_jobs_nobody_submitted_are_strangers() -> None:
    parsed = parse("START,X,1,10,100.0\nEND,X,1,10,101.0\n")
    assert len(judge(parsed.executions, {}, Faults()).strangers) == 1


RETRY_HISTORY = (
    "START,J,1,10,100.0\nFAIL,J,1,10,100.1\n"
    "START,J,2,10,100.3\nFAIL,J,2,10,100.4\n"
    "START,J,3,11,101.0\nEND,J,3,11,101.1\n"
)


def planned(*attempts: int) -> tuple[tuple[int, str, float], ...]:
    return tuple((a, f"PlannedFailure: attempt {a} fails as planned", 100.0 + a) for a in attempts)


def test_planned_failures_are_counted_as_the_plan_says() -> None:
    parsed = parse(RETRY_HISTORY)
    good = row("J", attempt=3, plan="retry", fail_times=2, errors=planned(1, 2))
    verdict = judge(parsed.executions, {"J": good}, Faults())
    assert [f.reason for f in verdict.fates] == [
        "failed as planned",
        "failed as planned",
        "the counted success",
    ]
    assert verdict.job_problems == []
    assert verdict.unexplained == []


def test_a_miscounted_retry_fails_the_check() -> None:
    parsed = parse(RETRY_HISTORY)
    # An attempt with no errors entry.
    gap = row("J", attempt=3, plan="retry", fail_times=2, errors=planned(1))
    assert RETRIES in checks(judge(parsed.executions, {"J": gap}, Faults()))
    # An errors entry for the successful attempt.
    extra = row("J", attempt=3, plan="retry", fail_times=2, errors=planned(1, 2, 3))
    assert RETRIES in checks(judge(parsed.executions, {"J": extra}, Faults()))
    # A planned failure beyond the plan.
    beyond = row("J", attempt=3, plan="retry", fail_times=1, errors=planned(1, 2))
    verdict = judge(parsed.executions, {"J": beyond}, Faults())
    assert [f.judgement for f in verdict.unexplained] == [Judgement.UNEXPLAINED]
    assert "beyond the plan" in verdict.unexplained[0].reason
    # A FAILED job whose attempts were not used up.
    short = row("J", "FAILED", attempt=2, plan="retry", fail_times=2, errors=planned(1, 2))
    two = parse("START,J,1,10,100.0\nFAIL,J,1,10,100.1\nSTART,J,2,10,100.3\nFAIL,J,2,10,100.4\n")
    assert RETRIES in checks(judge(two.executions, {"J": short}, Faults()))


TIMEOUT_HISTORY = (
    "START,T,1,10,100.0\nCANCEL,T,1,10,101.01\n"
    "START,T,2,10,101.2\nCANCEL,T,2,10,102.21\n"
    "START,T,3,11,102.5\nCANCEL,T,3,11,103.51\n"
)


def timeouts(*attempts: int) -> tuple[tuple[int, str, float], ...]:
    return tuple((a, "JobTimeout: the attempt ran longer than 1 s", 101.0 + a) for a in attempts)


def test_a_timeout_job_fails_after_its_attempts_with_job_timeouts() -> None:
    parsed = parse(TIMEOUT_HISTORY)
    failed = row(
        "T",
        "FAILED",
        3,
        plan="timeout",
        max_attempts=3,
        timeout_seconds=1,
        errors=timeouts(1, 2, 3),
    )
    verdict = judge(parsed.executions, {"T": failed}, Faults())
    assert [f.reason for f in verdict.fates] == ["timed out"] * 3
    assert verdict.job_problems == []
    # A JobTimeout without an execution that ran its time out.
    quick = parse(TIMEOUT_HISTORY.replace("101.01", "100.3"))
    assert len(judge(quick.executions, {"T": failed}, Faults()).unexplained) == 1
    # A timeout job that SUCCEEDED.
    run = parse("START,T,1,10,100.0\nEND,T,1,10,100.5\n")
    succeeded = row("T", plan="timeout", max_attempts=3, timeout_seconds=1)
    assert checks(judge(run.executions, {"T": succeeded}, Faults())) == [FINAL_STATE]


# Attempt 1 in pid 10, SIGTERMed at 100.5; the rescuer took the attempt at 104.
SHUTDOWN_HISTORY = "START,J,1,10,100.0\nCANCEL,J,1,10,102.5\nSTART,J,2,11,105.0\nEND,J,2,11,106.0\n"


def test_an_attempt_lost_by_a_stopping_worker_is_used_by_a_shutdown() -> None:
    parsed = parse(SHUTDOWN_HISTORY)
    faults = Faults(terms={10: 100.5}, exits={10: 103.0})
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=104.0)}, faults)
    (used,) = verdict.unexplained
    assert used.reason.startswith("attempt used by a shutdown")
    # A job FAILED by it fails "none FAILED by a shutdown".
    failed = row("J", "FAILED", attempt=2, max_attempts=2, a1=104.0, a2=107.0)
    history = parse(SHUTDOWN_HISTORY.replace("END,J,2,11,106.0\n", ""))
    killed = Faults(kills={11: 106.5}, terms={10: 100.5}, exits={10: 103.0})
    assert SHUTDOWN_FAILED in checks(judge(history.executions, {"J": failed}, killed))


def test_an_attempt_lost_to_a_shutdown_during_an_outage_is_the_known_limitation() -> None:
    parsed = parse(SHUTDOWN_HISTORY)
    faults = Faults(
        terms={10: 100.5}, exits={10: 103.0}, windows=[Window(101.0, 104.5, "PostgreSQL stopped")]
    )
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=104.0)}, faults)
    assert verdict.unexplained == []
    (limitation,) = verdict.limitations
    assert limitation.reason.startswith(LOST_TO_SHUTDOWN_IN_OUTAGE)
    # An outage after the worker had exited explains nothing.
    later = Faults(
        terms={10: 100.5}, exits={10: 103.0}, windows=[Window(103.5, 104.5, "PostgreSQL stopped")]
    )
    verdict = judge(parsed.executions, {"J": row("J", attempt=2, a1=104.0)}, later)
    assert verdict.limitations == []
    assert len(verdict.unexplained) == 1


def test_interrupted_counts_only_after_the_hand_backs_in_a_row() -> None:
    handbacks = "".join(
        f"START,J,1,{pid},{t}\nCANCEL,J,1,{pid},{t + 0.5}\n"
        for pid, t in ((10, 100.0), (11, 101.0), (12, 102.0))
    )
    tail = "START,J,1,13,103.0\nCANCEL,J,1,13,103.5\nSTART,J,2,14,104.0\nEND,J,2,14,104.5\n"
    interrupted = "Interrupted: the attempt was stopped by a worker shutdown after 3 hand-backs"
    rows = {"J": row("J", attempt=2, errors=((1, interrupted, 103.6),))}
    terms = {pid: t + 0.1 for pid, t in ((10, 100.0), (11, 101.0), (12, 102.0), (13, 103.0))}
    verdict = judge(parse(handbacks + tail).executions, rows, Faults(terms=terms))
    assert verdict.unexplained == []
    too_soon = handbacks.split("START,J,1,12")[0] + tail
    verdict = judge(parse(too_soon).executions, rows, Faults(terms=terms))
    (used,) = verdict.unexplained
    assert used.reason.startswith("attempt used by a shutdown")


CANCEL_HISTORY = "START,C,1,10,100.0\nCANCEL,C,1,10,101.2\n"


def test_an_accepted_cancellation_is_honoured() -> None:
    cancelled = {"C": row("C", "CANCELLED", plan="cancel")}
    faults = Faults(cancels={"C": CancelRequest(101.0, 101.05, 202)})
    verdict = judge(parse(CANCEL_HISTORY).executions, cancelled, faults)
    assert fates(verdict) == [(1, "cancelled as requested", Judgement.EXPLAINED)]
    assert verdict.job_problems == []
    assert verdict.cancel_delays == [pytest.approx(0.15)]


def test_a_cancellation_not_honoured_fails_the_check() -> None:
    faults = Faults(cancels={"C": CancelRequest(101.0, 101.05, 202)})
    # The job ran on to its end and SUCCEEDED.
    ran_on = parse("START,C,1,10,100.0\nEND,C,1,10,130.0\n")
    verdict = judge(ran_on.executions, {"C": row("C", plan="cancel")}, faults)
    assert CANCEL_HONOURED in checks(verdict)
    # It started again after the DELETE was answered.
    again = parse(CANCEL_HISTORY + "START,C,1,11,103.0\nCANCEL,C,1,11,104.0\n")
    verdict = judge(again.executions, {"C": row("C", "CANCELLED", plan="cancel")}, faults)
    assert CANCEL_HONOURED in checks(verdict)
    # The DELETE came too late.
    late = Faults(cancels={"C": CancelRequest(101.0, 101.05, 409)})
    verdict = judge(parse(CANCEL_HISTORY).executions, {"C": row("C", "CANCELLED")}, late)
    assert CANCEL_HONOURED not in checks(verdict)  # a plain job: nobody meant to cancel it
    planned_cancel = {"C": row("C", "CANCELLED", plan="cancel")}
    assert CANCEL_HONOURED in checks(judge(parse(CANCEL_HISTORY).executions, planned_cancel, late))


def test_a_job_cancelled_while_pending_after_a_hand_back_keeps_the_attempt_before() -> None:
    # Handed back (attempt 1 -> 0), then cancelled at once by the DELETE (200).
    parsed = parse("START,C,1,10,100.0\nCANCEL,C,1,10,101.0\n")
    faults = Faults(
        terms={10: 100.5}, exits={10: 101.2}, cancels={"C": CancelRequest(101.3, 101.35, 200)}
    )
    verdict = judge(parsed.executions, {"C": row("C", "CANCELLED", 0, plan="cancel")}, faults)
    assert fates(verdict) == [(1, "handed back by its stopping worker", Judgement.EXPLAINED)]
    assert verdict.job_problems == []


# A retried job's history: created, claimed, killed and taken back, claimed, done.
RETRIED = (
    (None, "PENDING", 0),
    ("PENDING", "RUNNING", 1),
    ("RUNNING", "RETRYING", 1),
    ("RETRYING", "RUNNING", 2),
    ("RUNNING", "SUCCEEDED", 2),
)
KILLED_ONCE = "START,J,1,10,100.0\nSTART,J,2,11,104.0\nEND,J,2,11,105.0\n"


def history_problems(history: tuple[tuple[str | None, str, int], ...], **fields: Any) -> list[str]:
    job = dataclasses.replace(row("J", attempt=2, a1=103.0, **fields), history=history)
    verdict = judge(parse(KILLED_ONCE).executions, {"J": job}, Faults({10: 101.0}))
    return [p.text for p in verdict.job_problems if p.check == HISTORY]


def test_a_history_that_tells_what_the_row_tells_passes() -> None:
    assert history_problems(RETRIED) == []
    assert history_problems(RETRIED[1:]) == []  # inserted by SQL: no creation event


@pytest.mark.parametrize(
    ("history", "problem"),
    [
        (RETRIED[:3] + RETRIED[4:], "event 3 moves from RUNNING, but it was RETRYING"),
        (RETRIED[:-1], "its events end RUNNING, its row is SUCCEEDED"),
        ((*RETRIED, ("SUCCEEDED", "PENDING", 2)), "event 5 moves SUCCEEDED to PENDING"),
        (((None, "RUNNING", 0),), "created RUNNING, not PENDING or WAITING"),
        (
            (*RETRIED[:1], ("PENDING", "RUNNING", 2), ("RUNNING", "SUCCEEDED", 2)),
            "1 executions of attempt 1, but 0 claims of it",
        ),
        (
            (*RETRIED[:3], ("RETRYING", "RUNNING", 2), ("RUNNING", "RETRYING", 2), *RETRIED[3:]),
            "1 errors entries, but its events end 2 attempts in a failure",
        ),
    ],
)
def test_a_history_with_a_lost_or_extra_event_fails_the_check(
    history: tuple[tuple[str | None, str, int], ...], problem: str
) -> None:
    problems = history_problems(history)
    assert any(problem in text for text in problems), problems


def workflow_rows(**child: Any) -> dict[str, JobRow]:
    """a -> b: a SUCCEEDED at t=100 (unless told otherwise), b as given."""
    parent = dataclasses.replace(row("A"), completed=100.0)
    fields = {"parents": ("A",), **child}
    return {"A": parent, "B": dataclasses.replace(row("B"), **fields)}


def workflow_problems(rows: dict[str, JobRow], executions: str) -> list[str]:
    verdict = judge(parse(executions).executions, rows, Faults())
    return [p.text for p in verdict.job_problems if p.check == WORKFLOWS]


def test_a_child_that_started_after_its_parent_passes() -> None:
    assert (
        workflow_problems(
            workflow_rows(),
            "START,A,1,10,99.0\nEND,A,1,10,99.9\nSTART,B,1,10,100.2\nEND,B,1,10,100.5\n",
        )
        == []
    )


def test_a_child_that_started_before_its_parents_success_fails_the_check() -> None:
    problems = workflow_problems(
        workflow_rows(), "START,A,1,10,99.0\nEND,A,1,10,99.9\nSTART,B,1,11,99.5\nEND,B,1,11,99.8\n"
    )
    assert problems == ["started 0.500s before its last parent's success"]


def test_a_failed_parent_must_cancel_its_children_unrun() -> None:
    rows = workflow_rows(state="CANCELLED", cancelled_by="A")
    rows["A"] = dataclasses.replace(rows["A"], state="FAILED")
    assert workflow_problems(rows, "") == []
    assert workflow_problems(rows, "START,B,1,10,100.2\nCANCEL,B,1,10,100.3\n") == [
        "it ran, although a parent never succeeded"
    ]
    succeeded = workflow_rows()
    succeeded["A"] = dataclasses.replace(succeeded["A"], state="FAILED")
    assert "a parent did not succeed, but it ended SUCCEEDED" in workflow_problems(succeeded, "")[0]
    # All parents SUCCEEDED, yet cancelled for an ancestor: wrong too.
    wrongly = workflow_rows(state="CANCELLED", cancelled_by="A")
    assert workflow_problems(wrongly, "") == [
        "cancelled for an ancestor, but its parents all SUCCEEDED"
    ]


LIMITS_SET = Limits(key_limit=2, rate_per_s=10.0, rate_burst=3)


def limit_problems(rows: dict[str, JobRow], text: str) -> tuple[list[str], Verdict]:
    verdict = judge(parse(text).executions, rows, Faults(), limits=LIMITS_SET)
    return [p.text for p in verdict.job_problems if p.check == LIMITS], verdict


def test_a_key_at_its_limit_passes_and_one_above_it_fails() -> None:
    rows = {j: dataclasses.replace(row(j), concurrency_key="k") for j in "ABC"}
    two_then_one = (
        "START,A,1,10,100.0\nSTART,B,1,10,100.1\nEND,A,1,10,100.5\n"
        "START,C,1,10,100.5\nEND,B,1,10,100.9\nEND,C,1,10,101.0\n"
    )
    problems, verdict = limit_problems(rows, two_then_one)
    assert (problems, verdict.key_peak) == ([], 2)
    three = "START,A,1,10,100.0\nSTART,B,1,10,100.1\nSTART,C,1,10,100.2\n" + (
        "END,A,1,10,100.5\nEND,B,1,10,100.5\nEND,C,1,10,100.5\n"
    )
    problems, verdict = limit_problems(rows, three)
    assert problems == ["3 executions of key k at once (limit 2)"]
    assert verdict.key_peak == 3


def test_starts_within_the_bucket_pass_and_beyond_it_fail() -> None:
    # 10/s, burst 3: three at once, then one every 0.1 s, is the bucket exactly.
    paced = (100.0, 100.0, 100.0, 100.1, 100.2, 100.3)
    rows = {"A": dataclasses.replace(row("A"), rate_limit="r", claimed_at=paced)}
    problems, verdict = limit_problems(rows, "")
    assert problems == []
    assert verdict.rate_excess == pytest.approx(3.0)
    rushed = (100.0, 100.0, 100.0, 100.0, 100.05)
    rows = {"A": dataclasses.replace(row("A"), rate_limit="r", claimed_at=rushed)}
    problems, _ = limit_problems(rows, "")
    assert problems == ["4.50 starts beyond the rate limit's 10/s (burst 3)"]
