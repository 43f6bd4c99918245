"""How a failed attempt is classified, and the text kept of it.

Everything an executor raises is retryable, except :class:`PermanentError` and
its kin, which no later attempt could fix. Pure: no I/O.
"""

from __future__ import annotations

import re
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


MAX_ERROR_CHARS = 8192
"""The longest error text kept of one attempt (``last_error``, an ``errors`` entry)."""

UNSTORABLE_ERROR = (
    "UnstorableError: PostgreSQL refused this attempt's error text; the worker logged it"
)
"""Recorded instead when PostgreSQL refuses even the :func:`storable_error` text
(e.g. a character the database's encoding lacks)."""

# PostgreSQL text holds every Unicode character but U+0000. A lone surrogate
# (U+D800 to U+DFFF, e.g. from bytes decoded with "surrogateescape") is no
# character at all: it has no UTF-8 to send.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _cut_marker(cut: int, total: int) -> str:
    return f"… [{cut} of {total} characters cut]"


def storable_error(text: str) -> str:
    """``text`` as PostgreSQL can store it: U+0000 and lone surrogates become
    U+FFFD, and a text over :data:`MAX_ERROR_CHARS` keeps its beginning and ends
    with a marker saying how many characters were cut."""
    total = len(text)
    if total > MAX_ERROR_CHARS:
        # Room for the longest marker this text can need, then for the one it
        # does need (fewer digits cut, never more): the result fits the limit.
        budget = MAX_ERROR_CHARS - len(_cut_marker(total, total))
        keep = MAX_ERROR_CHARS - len(_cut_marker(total - budget, total))
        # Cut first, so megabytes are not searched: replacing keeps the length.
        text = text[:keep] + _cut_marker(total - keep, total)
    return _UNSTORABLE.sub("\ufffd", text)
