from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.e2e.harness import System

SystemFactory = Callable[..., System]


@pytest.fixture
def make_system(database: str, servers: Servers, tmp_path: Path) -> Iterator[SystemFactory]:
    """Make systems of real processes; every process is stopped when the test ends."""
    made: list[System] = []

    def make(**env: str) -> System:
        system = System(database, servers.nats_url, tmp_path, env=env)
        made.append(system)
        return system

    yield make
    for system in made:
        system.stop_all()
