"""Job ids: ULIDs in their 26-character Crockford form, sortable by creation time."""

from __future__ import annotations

from ulid import ULID


def new_id() -> str:
    return str(ULID())


def is_valid(value: str) -> bool:
    """True when ``value`` is a canonical ULID string (what ``new_id`` makes)."""
    if len(value) != 26:
        return False
    try:
        return str(ULID.from_str(value)) == value
    except ValueError:
        return False
