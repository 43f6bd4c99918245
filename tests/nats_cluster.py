"""A real three-node NATS cluster with JetStream on 127.0.0.1, for tests that need one.

Each node is an :class:`~orchestrix.devservers.EmbeddedNats` of its own: its own
client, route and monitoring ports (picked once, below the ephemeral range, so
a restarted node comes back where the others and the clients look for it), its
own store folder, and routes to the other two. ``start`` returns once every
node sees the other two over its routes and JetStream has a meta leader on
every node; ``kill`` and ``restart`` take one node down and back. Every wait
has a deadline, and ``stop`` ends every process, whatever state the test left
the cluster in.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from orchestrix.devservers import EmbeddedNats, NatsRoutes

_POLL_S = 0.05


def quiet_ports(count: int) -> list[int]:
    """``count`` distinct free ports of 127.0.0.1 below the kernel's ephemeral range.

    A port picked by bind(0) is an ephemeral one, which any outgoing connection
    (a route dialling a node that is not up yet, another test's client) may be
    handed before the server binds it, or while a killed node is down. Below the
    range only an explicit bind can take it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports: list[int] = []
    for _ in range(1000):
        port = random.randrange(10_000, max(low, 10_001))
        if port in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"found only {len(ports)} free ports below {low}")


class NatsCluster:
    """``size`` nodes in the folders ``root / "n0"``, ``root / "n1"``, ..."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.name = f"orchestrix-test-{uuid.uuid4().hex[:8]}"
        self.nodes: list[EmbeddedNats] = []
        self.urls: list[str] = []
        self._placed = 0
        self._place()

    def _place(self) -> None:
        """New ports for every node (a client, a route and a monitoring port each),
        and new folders when this is a retry: a store must not hold another cluster's."""
        folder = "" if self._placed == 0 else f"retry{self._placed}-"
        self._placed += 1
        ports = quiet_ports(3 * self.size)
        clients, routes, monitors = ports[::3], ports[1::3], ports[2::3]
        self.urls = [f"nats://127.0.0.1:{port}" for port in clients]
        self.nodes = []
        for index in range(self.size):
            others = tuple(f"nats://127.0.0.1:{p}" for i, p in enumerate(routes) if i != index)
            membership = NatsRoutes(self.name, routes[index], others, monitors[index])
            node = EmbeddedNats(
                self.root / f"{folder}n{index}", port=clients[index], cluster=membership
            )
            self.nodes.append(node)

    def node_at(self, port: int | None) -> EmbeddedNats:
        """The node serving clients on ``port``."""
        (node,) = [node for node in self.nodes if node.port == port]
        return node

    def start(self, timeout_s: float = 20.0) -> None:
        """Start every node; return once the cluster has formed (see ``wait_formed``)."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(3):
            try:
                for node in self.nodes:
                    node.start(timeout_s=max(deadline - time.monotonic(), 1.0))
                self.wait_formed(deadline - time.monotonic())
                return
            except RuntimeError as exc:
                self.stop()
                # Someone bound one of the ports between our check and the server's bind.
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                self._place()
            except BaseException:
                self.stop()
                raise

    def kill(self, node: EmbeddedNats) -> None:
        """SIGKILL one node: no goodbye to its routes or its clients."""
        node.kill()

    def restart(self, node: EmbeddedNats, timeout_s: float = 20.0) -> None:
        """Start a killed node again on its ports and store; return once it has rejoined."""
        deadline = time.monotonic() + timeout_s
        node.start(timeout_s=max(deadline - time.monotonic(), 1.0))
        self.wait_formed(deadline - time.monotonic())

    def wait_formed(self, timeout_s: float) -> None:
        """Every running node routes to every other one, and JetStream is healthy on each."""
        deadline = time.monotonic() + timeout_s
        running = [node for node in self.nodes if node.process and node.process.poll() is None]
        names = {node.server_name for node in running}
        problem = "not checked yet"
        while time.monotonic() < deadline:
            problem = ""
            for node in running:
                peers = self.route_peers(node)
                if peers != names - {node.server_name}:
                    problem = f"{node.server_name} routes to {sorted(peers)}"
                    break
                health = self._monitor(node, "/healthz")
                if health.get("status") != "ok":
                    problem = f"{node.server_name} /healthz says {health}"
                    break
            if not problem:
                return
            time.sleep(_POLL_S)
        raise TimeoutError(f"the NATS cluster did not form in {timeout_s:.1f}s: {problem}")

    def route_peers(self, node: EmbeddedNats) -> set[str]:
        """The server names at the other end of a node's routes (several routes per peer)."""
        routes = self._monitor(node, "/routez").get("routes")
        if not isinstance(routes, list):
            return set()
        return {str(route.get("remote_name")) for route in routes}

    def stop(self) -> None:
        """Stop every node; safe at any point, also after a failed start."""
        for node in self.nodes:
            node.stop(timeout_s=5.0)

    @staticmethod
    def _monitor(node: EmbeddedNats, path: str) -> dict[str, object]:
        assert node.cluster is not None
        url = f"http://127.0.0.1:{node.cluster.monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                body: dict[str, object] = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body
            with exc:
                body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError) as exc:
            body = {"error": str(exc)}
        return body
