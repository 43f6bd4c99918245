"""A small Kustomize: exactly the features the kustomizations under deploy/k8s use.

CI machines need not have kubectl, so the deploy tests render the overlays with
this when it is missing; where kubectl is there, a test checks that both render
the same. Supported, and nothing else (anything else raises KustomizeError, so a
kustomization that grows a feature fails the tests until this grows it too):

- ``resources``: YAML files (several documents each) and folders holding a
  kustomization.yaml;
- ``namespace``: set on every namespaced resource;
- ``images``: ``name`` with ``newName`` / ``newTag`` / ``digest``, in the pod
  templates of workloads;
- ``replicas``: ``name`` and ``count``;
- ``configMapGenerator`` / ``secretGenerator``: ``literals`` and ``files``
  (``key=path`` or ``path``), ``behavior`` create, merge or replace, and the name
  hash suffix kustomize adds, with references from pod templates renamed;
- ``patches``: ``path`` to a strategic-merge patch naming its target by kind and
  name, which may only set map fields (a list or a null in it would need merge
  keys or deletion, which this does not do);
- ``configurations``: files holding only ``nameReference`` entries (``kind`` and
  ``fieldSpecs`` of ``kind`` and ``path``), which rename references to a
  generated ConfigMap or Secret in other fields, such as a custom resource's.
  Like kustomize, the entries of every kustomization reached apply to the
  whole rendering.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml  # type: ignore[import-untyped, unused-ignore]

Resource = dict[str, Any]

KUSTOMIZATION_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "images",
        "replicas",
        "configMapGenerator",
        "secretGenerator",
        "patches",
        "configurations",
    }
)
GENERATOR_FIELDS = frozenset({"name", "behavior", "literals", "files"})
CLUSTER_SCOPED = frozenset({"Namespace"})
NAMESPACED = frozenset(
    {
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "StatefulSet",
        "Job",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ScaledObject",
        "TriggerAuthentication",
    }
)
# Kinds whose pod template is at spec.template.
WORKLOADS = frozenset({"Deployment", "StatefulSet", "Job"})
SCALABLE = frozenset({"Deployment", "StatefulSet"})


class KustomizeError(Exception):
    """A kustomization uses something this renderer does not implement."""


@dataclass
class _Item:
    resource: Resource
    generated: bool = False


@dataclass(frozen=True)
class _NameReference:
    """A field of ``referrer`` objects that holds the name of a ``kind`` object."""

    kind: str
    referrer: str
    path: tuple[str, ...]  # map keys; a list on the way is crossed element by element


@dataclass
class _Rendering:
    items: list[_Item]
    references: list[_NameReference]


def build(directory: Path) -> list[Resource]:
    """Render the kustomization in ``directory`` as ``kubectl kustomize`` would."""
    rendering = _build(directory.resolve())
    _add_hash_suffixes(rendering)
    return [item.resource for item in rendering.items]


def load_documents(path: Path) -> list[Resource]:
    """The non-empty YAML documents of a file, each a mapping."""
    documents: list[Resource] = []
    for document in yaml.safe_load_all(path.read_text()):
        if document is None:
            continue
        if not isinstance(document, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
        documents.append(cast(Resource, document))
    return documents


def _build(directory: Path) -> _Rendering:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")

    items: list[_Item] = []
    references: list[_NameReference] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            below = _build(target)
            items.extend(below.items)
            references.extend(below.references)
        else:
            items.extend(_Item(resource) for resource in load_documents(target))
    for entry in kustomization.get("configurations", []):
        references.extend(_name_references(directory / entry))
    for resource in items:
        _check_kind(resource.resource, path)

    for spec in kustomization.get("configMapGenerator", []):
        _generate(items, directory, spec, "ConfigMap")
    for spec in kustomization.get("secretGenerator", []):
        _generate(items, directory, spec, "Secret")
    for patch in kustomization.get("patches", []):
        _patch(items, directory, patch)
    if "namespace" in kustomization:
        for item in items:
            if item.resource["kind"] not in CLUSTER_SCOPED:
                item.resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _set_image(items, image)
    for replicas in kustomization.get("replicas", []):
        _set_replicas(items, replicas)
    return _Rendering(items, references)


def _name_references(path: Path) -> list[_NameReference]:
    """The nameReference entries of a ``configurations`` file, and nothing else."""
    configuration = yaml.safe_load(path.read_text()) or {}
    if set(configuration) != {"nameReference"}:
        raise KustomizeError(f"{path}: only nameReference is supported")
    references: list[_NameReference] = []
    for entry in configuration["nameReference"]:
        if set(entry) != {"kind", "fieldSpecs"} or entry["kind"] not in ("ConfigMap", "Secret"):
            raise KustomizeError(f"{path}: a nameReference names a ConfigMap or Secret kind")
        for spec in entry["fieldSpecs"]:
            if set(spec) != {"kind", "path"}:
                raise KustomizeError(f"{path}: a fieldSpec is only a kind and a path")
            path_keys = tuple(spec["path"].split("/"))
            references.append(_NameReference(entry["kind"], spec["kind"], path_keys))
    return references


def _check_kind(resource: Resource, where: Path) -> None:
    kind = resource.get("kind")
    if kind not in NAMESPACED | CLUSTER_SCOPED:
        raise KustomizeError(f"{where}: kind {kind!r} is not known to this renderer")


def _name(resource: Resource) -> str:
    name: str = resource["metadata"]["name"]
    return name


def _find(items: list[_Item], kind: str, name: str) -> list[_Item]:
    return [i for i in items if i.resource["kind"] == kind and _name(i.resource) == name]


def _generate(items: list[_Item], directory: Path, spec: dict[str, Any], kind: str) -> None:
    unknown = set(spec) - GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported generator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for literal in spec.get("literals", []):
        key, sep, value = str(literal).partition("=")
        if not sep:
            raise KustomizeError(f"{directory}: literal {literal!r} has no '='")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        data[key] = value
    for entry in spec.get("files", []):
        key, sep, file = str(entry).partition("=")
        if not sep:
            key, file = Path(entry).name, entry
        data[key] = (directory / file).read_text()
    if kind == "Secret":
        data = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}

    name = spec["name"]
    behavior = spec.get("behavior", "create")
    existing = _find(items, kind, name)
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{directory}: {kind} {name} already exists")
        resource: Resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
        resource["data"] = data
        if kind == "Secret":
            resource["type"] = "Opaque"
        items.append(_Item(resource, generated=True))
    elif behavior in ("merge", "replace"):
        if len(existing) != 1 or not existing[0].generated:
            raise KustomizeError(f"{directory}: no generated {kind} {name} to {behavior}")
        target = existing[0].resource
        target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
    else:
        raise KustomizeError(f"{directory}: unsupported behavior {behavior!r}")


def _patch(items: list[_Item], directory: Path, patch: dict[str, Any]) -> None:
    if set(patch) != {"path"}:
        raise KustomizeError(f"{directory}: a patch must be only a path, got {sorted(patch)}")
    documents = load_documents(directory / patch["path"])
    if len(documents) != 1:
        raise KustomizeError(f"{directory}: {patch['path']} must hold exactly one patch")
    document = documents[0]
    targets = _find(items, document["kind"], _name(document))
    if len(targets) != 1:
        raise KustomizeError(f"{directory}: {patch['path']} matches {len(targets)} resources")
    _merge(targets[0].resource, document, patch["path"])


def _merge(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    for key, value in patch.items():
        if isinstance(value, list) or value is None:
            raise KustomizeError(f"{where}: patching lists or deleting fields is not supported")
        if isinstance(value, dict):
            child = target.setdefault(key, {})
            if not isinstance(child, dict):
                raise KustomizeError(f"{where}: {key} is not a mapping in the target")
            _merge(child, value, where)
        else:
            target[key] = copy.deepcopy(value)


def _pod_spec(resource: Resource) -> dict[str, Any] | None:
    if resource["kind"] not in WORKLOADS:
        return None
    spec: dict[str, Any] = resource["spec"]["template"]["spec"]
    return spec


def _containers(resource: Resource) -> list[dict[str, Any]]:
    pod = _pod_spec(resource)
    if pod is None:
        return []
    containers: list[dict[str, Any]] = pod.get("initContainers", []) + pod.get("containers", [])
    return containers


def _split_image(image: str) -> tuple[str, str]:
    """('registry:5000/name', ':tag' or '@sha256:...' or '')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_image(items: list[_Item], image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"images: unsupported fields {sorted(unknown)}")
    for item in items:
        for container in _containers(item.resource):
            name, suffix = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                suffix = "@" + image["digest"]
            elif "newTag" in image:
                suffix = ":" + str(image["newTag"])
            container["image"] = name + suffix


def _set_replicas(items: list[_Item], replicas: dict[str, Any]) -> None:
    if set(replicas) != {"name", "count"}:
        raise KustomizeError(f"replicas: unsupported fields {sorted(replicas)}")
    matched = [
        item
        for item in items
        if item.resource["kind"] in SCALABLE and _name(item.resource) == replicas["name"]
    ]
    if not matched:
        raise KustomizeError(f"replicas: nothing is named {replicas['name']!r}")
    for item in matched:
        item.resource["spec"]["replicas"] = replicas["count"]


def _go_json(value: object) -> str:
    """json.Marshal of Go: sorted keys, no spaces, HTML characters escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def content_hash(resource: Resource) -> str:
    """The suffix kustomize appends to a generated ConfigMap's or Secret's name."""
    # kustomize means to hash the name too, but looks "metadata/name" up as one
    # key, finds nothing and hashes "" instead: equal data, equal suffix.
    encoded: dict[str, Any] = {"kind": resource["kind"], "name": "", "data": resource["data"]}
    if resource["kind"] == "Secret":
        encoded["type"] = resource.get("type", "Opaque")
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()
    # kustomize's encoding: the first ten hex digits, with some swapped for
    # letters so that the suffix never spells a word.
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _add_hash_suffixes(rendering: _Rendering) -> None:
    items = rendering.items
    renamed: dict[tuple[str, str], str] = {}
    for item in items:
        if item.generated:
            old = _name(item.resource)
            new = f"{old}-{content_hash(item.resource)}"
            item.resource["metadata"]["name"] = new
            renamed[(item.resource["kind"], old)] = new
    for item in items:
        pod = _pod_spec(item.resource)
        if pod is None:
            continue
        for container in _containers(item.resource):
            for source in container.get("envFrom", []):
                _rename(source.get("configMapRef"), "name", "ConfigMap", renamed)
                _rename(source.get("secretRef"), "name", "Secret", renamed)
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {})
                _rename(reference.get("configMapKeyRef"), "name", "ConfigMap", renamed)
                _rename(reference.get("secretKeyRef"), "name", "Secret", renamed)
        for volume in pod.get("volumes", []):
            if "projected" in volume:
                raise KustomizeError("projected volumes are not supported")
            _rename(volume.get("configMap"), "name", "ConfigMap", renamed)
            _rename(volume.get("secret"), "secretName", "Secret", renamed)
    for reference in rendering.references:
        for item in items:
            if item.resource["kind"] == reference.referrer:
                _rename_along(item.resource, reference.path, reference.kind, renamed)


def _rename_along(
    node: object, path: tuple[str, ...], kind: str, renamed: dict[tuple[str, str], str]
) -> None:
    """Rename the reference at ``path`` below ``node``, in every element of a list."""
    if isinstance(node, list):
        for element in node:
            _rename_along(element, path, kind, renamed)
    elif isinstance(node, dict) and len(path) == 1:
        _rename(node, path[0], kind, renamed)
    elif isinstance(node, dict) and path:
        _rename_along(node.get(path[0]), path[1:], kind, renamed)


def _rename(
    reference: dict[str, Any] | None, field: str, kind: str, renamed: dict[tuple[str, str], str]
) -> None:
    if reference is not None and (kind, reference.get(field)) in renamed:
        reference[field] = renamed[(kind, reference[field])]
