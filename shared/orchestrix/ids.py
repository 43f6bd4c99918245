"""Job ids: ULIDs in their 26-character Crockford form, sortable by creation time."""

from __future__ import annotations

import re

from ulid import ULID

# The canonical form: 26 Crockford base32 digits, upper case, at most 7ZZZ…
# (128 bits). The same rule as the id column's CHECK constraint.
_CANONICAL = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


def new_id() -> str:
    return str(ULID())


def is_valid(value: str) -> bool:
    """True when ``value`` is a canonical ULID string (what ``new_id`` makes)."""
    return _CANONICAL.fullmatch(value) is not None
