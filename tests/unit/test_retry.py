from __future__ import annotations

import pytest
from orchestrix.errors import InvalidPayload, Kind, NoExecutor, PermanentError, classify, describe
from orchestrix.retry import Fail, Retry, backoff_s, decide


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [
        (1, 0.0, 0.5),  # base 1 s, lowest jitter: half the nominal delay
        (1, 0.999999, 0.9999995),
        (2, 0.0, 1.0),
        (3, 0.0, 2.0),
        (4, 0.5, 6.0),  # nominal 8 s * 0.75
        (10, 0.0, 30.0),  # capped at max 60 s, halved
        (10_000, 0.0, 30.0),  # no overflow for absurd attempts
    ],
)
def test_backoff_doubles_with_jitter_and_a_cap(
    attempt: int, jitter: float, expected: float
) -> None:
    assert backoff_s(attempt, base_s=1.0, max_s=60.0, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("attempt", "jitter"), [(0, 0.5), (1, 1.0), (1, -0.1)])
def test_backoff_rejects_nonsense(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        backoff_s(attempt, base_s=1.0, max_s=60.0, jitter=jitter)


@pytest.mark.parametrize(
    ("kind", "attempt", "max_attempts", "expected"),
    [
        (Kind.RETRYABLE, 1, 3, Retry(0.5)),
        (Kind.RETRYABLE, 2, 3, Retry(1.0)),
        (Kind.RETRYABLE, 3, 3, Fail()),
        (Kind.RETRYABLE, 1, 1, Fail()),
        (Kind.PERMANENT, 1, 3, Fail()),
    ],
)
def test_decide(kind: Kind, attempt: int, max_attempts: int, expected: object) -> None:
    decision = decide(
        kind, attempt=attempt, max_attempts=max_attempts, base_s=1.0, max_s=60.0, jitter=0.0
    )
    assert decision == expected


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (PermanentError("x"), Kind.PERMANENT),
        (InvalidPayload("x"), Kind.PERMANENT),
        (NoExecutor("x"), Kind.PERMANENT),
        (ValueError("x"), Kind.RETRYABLE),
        (TimeoutError(), Kind.RETRYABLE),
        (KeyError("k"), Kind.RETRYABLE),
    ],
)
def test_classify(exc: Exception, kind: Kind) -> None:
    assert classify(exc) is kind


def test_describe() -> None:
    assert describe(ValueError("bad thing")) == "ValueError: bad thing"
    assert describe(TimeoutError()) == "TimeoutError"
