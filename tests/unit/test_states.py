from __future__ import annotations

import itertools

import pytest
from orchestrix.states import (
    CANCELLABLE_AT_ONCE,
    CLAIMABLE,
    INITIAL,
    RETRYABLE_BY_HAND,
    TERMINAL,
    InvalidTransition,
    JobState,
    can_transition,
    check_transition,
    sources_of,
)

S = JobState
ALLOWED = {
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.RETRYING),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.PENDING),
    (S.RETRYING, S.RUNNING),
    (S.RETRYING, S.CANCELLED),
    (S.FAILED, S.PENDING),
    (S.CANCELLED, S.PENDING),
    # Workflows: a job waits for its parents; a retry may wait for them again.
    (S.WAITING, S.PENDING),
    (S.WAITING, S.CANCELLED),
    (S.FAILED, S.WAITING),
    (S.CANCELLED, S.WAITING),
}
FORBIDDEN = set(itertools.product(S, S)) - ALLOWED


def test_the_seven_states() -> None:
    # The seed's SCHEDULED (claimed, waiting in NATS) went with claims by workers;
    # WAITING came with workflows.
    assert [s.value for s in S] == [
        "PENDING",
        "WAITING",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "RETRYING",
        "CANCELLED",
    ]


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED))
def test_allowed(source: JobState, target: JobState) -> None:
    assert can_transition(source, target)
    check_transition(source, target)


@pytest.mark.parametrize(("source", "target"), sorted(FORBIDDEN))
def test_forbidden(source: JobState, target: JobState) -> None:
    assert not can_transition(source, target)
    with pytest.raises(InvalidTransition, match=f"a {source} job cannot become {target}"):
        check_transition(source, target)


def test_derived_sets() -> None:
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} == TERMINAL
    assert {S.PENDING, S.RETRYING} == CLAIMABLE
    assert sources_of(S.CANCELLED) >= CANCELLABLE_AT_ONCE
    assert sources_of(S.RUNNING) == {S.PENDING, S.RETRYING}
    assert sources_of(S.PENDING) == {S.RUNNING, S.WAITING} | RETRYABLE_BY_HAND
    assert sources_of(S.WAITING) == RETRYABLE_BY_HAND
    assert {S.PENDING, S.WAITING} == INITIAL
    assert {S.FAILED, S.CANCELLED} == RETRYABLE_BY_HAND
    assert RETRYABLE_BY_HAND <= TERMINAL
