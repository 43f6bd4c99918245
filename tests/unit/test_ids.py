from __future__ import annotations

import time

from orchestrix import ids
from ulid import ULID


def test_new_ids_are_canonical_ulids_of_now() -> None:
    before = time.time()
    made = [ids.new_id() for _ in range(1000)]
    after = time.time()
    for job_id in made:
        assert ids.is_valid(job_id)
        parsed = ULID.from_str(job_id)
        assert str(parsed) == job_id
        assert before - 0.001 <= parsed.timestamp <= after + 0.001


def test_new_ids_sort_in_the_order_they_were_made() -> None:
    # Thousands in one millisecond: the random part counts up within it.
    made = [ids.new_id() for _ in range(20_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_a_new_millisecond_starts_from_fresh_randomness() -> None:
    previous = ids.new_id()
    deadline = time.monotonic() + 1
    while (current := ids.new_id())[:10] == previous[:10]:
        assert time.monotonic() < deadline
        previous = current
    assert current > previous
    # 80 new random bits, not the previous ones plus 1.
    assert int(ULID.from_str(current)) % 2**80 != (int(ULID.from_str(previous)) + 1) % 2**80
