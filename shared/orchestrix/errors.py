"""How a failed attempt is classified: retried with backoff, or failed at once.

Everything an executor raises is retryable, except :class:`PermanentError` and
its kin, which no later attempt could fix.
"""

from __future__ import annotations

from enum import Enum


class PermanentError(Exception):
    """Raise from an executor when retrying cannot help: the job FAILS at once."""


class InvalidPayload(PermanentError):
    """The executor refuses the job's payload."""


class NoExecutor(PermanentError):
    """No executor is registered for the job's type on this worker."""


class JobTimeout(Exception):
    """The attempt ran longer than the job's ``timeout_seconds``: retryable."""


class Kind(Enum):
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


def classify(exc: BaseException) -> Kind:
    return Kind.PERMANENT if isinstance(exc, PermanentError) else Kind.RETRYABLE


def describe(exc: BaseException) -> str:
    """The line kept in ``last_error``: the class and the message."""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
