"""The error text kept for a failed attempt: what PostgreSQL cannot store is
replaced, and the length is bounded."""

from __future__ import annotations

import pytest
from orchestrix.errors import MAX_ERROR_CHARS, storable_error

LIMIT = MAX_ERROR_CHARS


def cut_marker(cut: int, total: int) -> str:
    return f"… [{cut} of {total} characters cut]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("ValueError: plain", "ValueError: plain"),
        ("ValueError: ß, 日本語, 🙂", "ValueError: ß, 日本語, 🙂"),  # all storable
        ("KeyError: \x00", "KeyError: \ufffd"),
        ("\x00\x00a\x00", "\ufffd\ufffda\ufffd"),
        # Lone surrogates, e.g. from bytes decoded with "surrogateescape": no UTF-8 for them.
        ("OSError: \udcff\ud800", "OSError: \ufffd\ufffd"),
        ("tab\tnewline\n\x01\x7f", "tab\tnewline\n\x01\x7f"),  # other controls are text
        ("x" * LIMIT, "x" * LIMIT),  # exactly at the limit: kept whole
        ("x" * (LIMIT + 1), "x" * 8163 + "… [30 of 8193 characters cut]"),
        ("\x00" * 5_000_000, "\ufffd" * 8155 + "… [4991845 of 5000000 characters cut]"),
    ],
    ids=[
        "empty",
        "ascii",
        "unicode",
        "nul",
        "nuls",
        "surrogates",
        "controls",
        "at-limit",
        "one-over",
        "megabytes-of-nul",
    ],
)
def test_storable_error(text: str, expected: str) -> None:
    assert storable_error(text) == expected


@pytest.mark.parametrize("length", [LIMIT + 1, LIMIT + 9, LIMIT + 10, 10**6, 10**7 + 3])
def test_a_cut_error_fills_the_limit_exactly_and_says_how_much_was_cut(length: int) -> None:
    error = storable_error("e" * length)
    assert len(error) <= LIMIT
    kept = error.index("…")
    assert error.endswith(cut_marker(length - kept, length))
    assert len(error) >= LIMIT - 1  # the marker's digits may shrink by one


def test_storable_error_is_idempotent() -> None:
    once = storable_error("a\x00" * LIMIT)
    assert storable_error(once) == once


def test_the_limit_is_the_documented_one() -> None:
    assert LIMIT == 8192  # README, "Error records"; the table above counts on it
