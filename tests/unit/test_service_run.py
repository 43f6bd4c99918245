"""How the CLI runs a service's main coroutine."""

from __future__ import annotations

import gc

from orchestrix import cli


def test_a_service_runs_with_what_its_imports_made_frozen_out_of_the_collector() -> None:
    frozen_while_running: list[int] = []

    async def service() -> None:
        frozen_while_running.append(gc.get_freeze_count())

    try:
        cli._run(service())
    finally:
        gc.unfreeze()
    # Every module imported so far, at least, is no longer walked by a full collection.
    assert frozen_while_running
    assert frozen_while_running[0] > 10_000
