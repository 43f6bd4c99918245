from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.e2e.harness import System
from tests.faults.proxy import Proxy

SystemFactory = Callable[..., System]


class Proxies:
    """Makes fault proxies (tests/faults/proxy.py) to the server of a URL."""

    def __init__(self) -> None:
        self.made: list[Proxy] = []

    def __call__(self, url: str) -> Proxy:
        proxy = Proxy.to(url)
        self.made.append(proxy)
        return proxy


@pytest.fixture
def proxy_to() -> Iterator[Proxies]:
    proxies = Proxies()
    yield proxies
    for proxy in proxies.made:
        proxy.stop()


@pytest.fixture
def make_system(
    database: str, servers: Servers, tmp_path: Path, proxy_to: Proxies
) -> Iterator[SystemFactory]:
    """Make systems of real processes; every process is stopped when the test ends.

    Faults end first, so that processes stop as they would on a healthy network;
    the proxies (``proxy_to``) close only after every process has stopped.
    """
    made: list[System] = []

    def make(**env: str) -> System:
        system = System(database, servers.nats_url, tmp_path, env=env)
        made.append(system)
        return system

    yield make
    for proxy in proxy_to.made:
        proxy.heal()
    for system in made:
        system.stop_all()
