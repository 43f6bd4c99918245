"""The retry policy: pure functions of the attempt and the settings, no clock.

Exponential backoff with jitter: the n-th failed attempt waits
``min(max, base * 2**(n-1))`` scaled by a factor in [0.5, 1.0), so retries of
many jobs that failed together spread out but never come sooner than half the
nominal delay.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrix.errors import Kind


@dataclass(frozen=True)
class Retry:
    delay_s: float


@dataclass(frozen=True)
class Fail:
    pass


Decision = Retry | Fail


def backoff_s(attempt: int, *, base_s: float, max_s: float, jitter: float) -> float:
    """Delay after failed attempt number ``attempt`` (1-based); ``jitter`` in [0, 1)."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, got {attempt}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    # Cap the exponent first: 2**attempt for a large attempt would overflow a float.
    nominal = min(max_s, base_s * 2.0 ** min(attempt - 1, 64))
    return nominal * (0.5 + jitter / 2)


def decide(
    kind: Kind, *, attempt: int, max_attempts: int, base_s: float, max_s: float, jitter: float
) -> Decision:
    if kind is Kind.PERMANENT or attempt >= max_attempts:
        return Fail()
    return Retry(backoff_s(attempt, base_s=base_s, max_s=max_s, jitter=jitter))
