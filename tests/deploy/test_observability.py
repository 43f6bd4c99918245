"""The Prometheus scrape configurations and the Grafana dashboard.

promtool and Grafana are not available offline, so these check the structure
and, above all, agreement with the code and the manifests: every series a query
names is one that shared/orchestrix/metrics.py exposes, with the labels it has;
scrape targets are the pods and ports the manifests declare.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import promql_parser
import pytest
from orchestrix.metrics import ApiMetrics, SchedulerMetrics, WorkerMetrics
from orchestrix.settings import Settings
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics import MetricWrapperBase

from tests.deploy.manifests import (
    DEPLOY,
    OVERLAYS,
    ROOT,
    SERVICES,
    component,
    compose_environment,
    load_yaml,
    namespace,
    only_container,
    render,
    settings_of,
)

OBSERVABILITY = DEPLOY / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "orchestrix.json"
JOBS = {f"orchestrix-{name}": name for name in SERVICES}
# Labels Prometheus itself adds to every series of the configurations here.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})
RELABEL_ACTIONS = frozenset(
    {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod", "labelmap", "labeldrop"}
    | {"labelkeep", "lowercase", "uppercase"}
)
NAME = re.compile(r"\borchestrix_[a-zA-Z0-9_]+")


def _metric_objects() -> list[MetricWrapperBase]:
    registry = CollectorRegistry
    holders: list[object] = [
        ApiMetrics(registry()),
        SchedulerMetrics(registry()),
        WorkerMetrics(concurrency=1, registry=registry()),
    ]
    return [
        value
        for holder in holders
        for value in vars(holder).values()
        if isinstance(value, MetricWrapperBase)
    ]


def series_catalogue() -> dict[str, frozenset[str]]:
    """Every series name metrics.py exposes, with its label names."""
    catalogue: dict[str, frozenset[str]] = {}
    for metric in _metric_objects():
        (family,) = metric.describe()
        labels = frozenset(getattr(metric, "_labelnames", ()))  # not public in prometheus_client
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_count", "_sum")}
        for suffix in suffixes[family.type]:
            catalogue[family.name + suffix] = labels
        if family.type == "histogram":
            catalogue[family.name + "_bucket"] = labels | {"le"}
    return catalogue


def _bucket_bounds(metric: Histogram, labels: tuple[str, ...]) -> list[float]:
    metric.labels(*labels).observe(1)
    (family,) = metric.collect()
    return [
        float(sample.labels["le"])
        for sample in family.samples
        if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf"
    ]


def test_job_histograms_reach_hours() -> None:
    """Jobs run for hours: their histograms must tell 1 h from 10 s."""
    metrics = WorkerMetrics(concurrency=1, registry=CollectorRegistry())
    duration = _bucket_bounds(metrics.job_duration, ("t", "q", "success"))
    assert max(duration) >= 3600, duration
    latency = _bucket_bounds(metrics.start_latency, ("t", "q"))
    assert max(latency) >= 3600, latency


# --- Prometheus ---------------------------------------------------------------


def _scrape_configs(name: str) -> dict[str, dict[str, Any]]:
    config = load_yaml(OBSERVABILITY / name)
    assert set(config) <= {"global", "scrape_configs", "rule_files", "alerting"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(JOBS), f"{name}: one job per process"
    return jobs


def _keep_regex(job: dict[str, Any], source: str) -> str:
    rules = [
        rule
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep" and rule["source_labels"] == [source]
    ]
    assert len(rules) == 1, f"{job['job_name']}: one keep rule on {source}"
    regex: str = rules[0]["regex"]
    return regex


@pytest.mark.parametrize("target", OVERLAYS)
def test_kubernetes_scrape_config_finds_the_pods(target: str) -> None:
    resources = render(target)
    for job_name, job in _scrape_configs("prometheus.yml").items():
        (discovery,) = job["kubernetes_sd_configs"]
        assert discovery["role"] == "pod"
        assert discovery["namespaces"]["names"] == [namespace(resources)]
        for rule in job["relabel_configs"]:
            assert rule.get("action", "replace") in RELABEL_ACTIONS
            re.compile(rule.get("regex", "(.*)"))
        workload = component(resources, JOBS[job_name])
        labels = workload["spec"]["template"]["metadata"]["labels"]
        prefix = "__meta_kubernetes_pod_label_"
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
            source = prefix + re.sub(r"[^a-zA-Z0-9_]", "_", label)
            assert re.fullmatch(_keep_regex(job, source), labels[label])
        port = _keep_regex(job, "__meta_kubernetes_pod_container_port_number")
        container = only_container(workload)
        assert [str(p["containerPort"]) for p in container["ports"]] == [port]
        settings = settings_of(resources, workload)
        expected = settings.api.port if JOBS[job_name] == "api" else settings.metrics.port
        assert port == str(expected)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert job.get("metrics_path", "/metrics") == annotations["prometheus.io/path"]


def test_compose_scrape_config_finds_the_containers() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    for job_name, job in _scrape_configs("prometheus-compose.yml").items():
        (discovery,) = job["dns_sd_configs"]
        assert discovery["names"] == [JOBS[job_name]]
        service = services[JOBS[job_name]]
        settings = Settings.from_env(compose_environment(service, compose["secrets"]))
        expected = settings.api.port if JOBS[job_name] == "api" else settings.metrics.port
        assert discovery["port"] == expected
        assert discovery["type"] == "A"
        assert job.get("metrics_path", "/metrics") == "/metrics"


# --- Grafana --------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _queries() -> list[str]:
    queries = [target["expr"] for panel in _panels() for target in panel["targets"]]
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "orchestrix"
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


# Grafana's variables, replaced by values of the right type before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$queue": ".*"}


@dataclass
class _Query:
    """What a parsed PromQL query uses."""

    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # metric, matcher labels
    grouping: set[str] = field(default_factory=set)  # by / without / on / ignoring labels
    quantiles_of: list[set[str]] = field(default_factory=list)  # histogram_quantile inputs


def _parse(query: str) -> _Query:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"unknown Grafana variable in {query!r}"
    try:
        expr = promql_parser.parse(query)
    except ValueError as exc:
        pytest.fail(f"not valid PromQL: {query!r}: {exc}")
    found = _Query()

    def selectors_of(node: promql_parser.Expr) -> set[str]:
        names: set[str] = set()

        def visit(child: promql_parser.Expr) -> None:
            if isinstance(child, promql_parser.VectorSelector) and child.name:
                names.add(child.name)

        promql_parser.walk(node, visit)
        return names

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {query!r}"
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            found.selectors.append((node.name, labels))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                found.grouping.update(node.modifier.matching.labels)
        elif isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            found.quantiles_of.append(selectors_of(node.args[1]))

    promql_parser.walk(expr, visit)
    return found


def test_dashboard_queries_only_metrics_that_exist() -> None:
    catalogue = series_catalogue()
    for query in _queries():
        variable = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        if variable is not None:  # a Grafana variable's query, not PromQL
            assert variable.group(2) in catalogue[variable.group(1)], query
            continue
        parsed = _parse(query)
        names = {name for name, _ in parsed.selectors}
        assert names, f"no Orchestrix metric in {query!r}"
        # The parser found every name the text mentions (none hides in a string).
        assert set(NAME.findall(query)) == names, query
        unknown = names - set(catalogue)
        assert not unknown, f"{sorted(unknown)} are not exposed by metrics.py (in {query!r})"
        for name, labels in parsed.selectors:
            assert labels <= catalogue[name], f"{name} has no label {labels - catalogue[name]}"
        known = set().union(*(catalogue[n] for n in names)) | TARGET_LABELS
        assert parsed.grouping <= known, f"{parsed.grouping - known} are no labels in {query!r}"
        for inputs in parsed.quantiles_of:
            assert inputs, f"histogram_quantile of nothing in {query!r}"
            assert all(n.endswith("_bucket") for n in inputs), f"needs _bucket: {query!r}"


def test_dashboard_catalogue_is_not_empty() -> None:
    """The catalogue above really reads metrics.py (guards the test itself)."""
    catalogue = series_catalogue()
    assert catalogue["orchestrix_jobs_succeeded_total"] == {"type", "queue"}
    assert catalogue["orchestrix_job_duration_seconds_bucket"] == {"type", "queue", "outcome", "le"}
    assert catalogue["orchestrix_worker_slots_busy"] == frozenset()


PANELS = {
    # title: series the panel must query
    "Jobs by state": {"orchestrix_queue_depth", "orchestrix_worker_slots_busy"},
    "State changes": {
        "orchestrix_jobs_created_total",
        "orchestrix_jobs_claimed_total",
        "orchestrix_jobs_succeeded_total",
        "orchestrix_jobs_failed_total",
        "orchestrix_jobs_retried_total",
    },
    "Throughput": {"orchestrix_jobs_succeeded_total"},
    "Failure rate": {"orchestrix_jobs_failed_total", "orchestrix_jobs_succeeded_total"},
    "Create → start latency": {"orchestrix_job_start_latency_seconds_bucket"},
    "Job duration": {"orchestrix_job_duration_seconds_bucket"},
    "Queue depth": {"orchestrix_queue_depth"},
    "Oldest waiting job": {"orchestrix_queue_oldest_waiting_seconds"},
    "Worker slots in use": {"orchestrix_worker_slots_busy", "orchestrix_worker_slots"},
    "Worker claim duration": {"orchestrix_worker_claim_duration_seconds_bucket"},
    "Workers lost, jobs rescued": {
        "orchestrix_workers_lost_total",
        "orchestrix_jobs_rescued_total",
        "orchestrix_handbacks_applied_total",
    },
}


@pytest.mark.parametrize("title", list(PANELS))
def test_dashboard_has_the_panels_asked_for(title: str) -> None:
    panels = [p for p in _panels() if p["title"] == title]
    assert panels, f"no panel {title!r}"
    used = {name for p in panels for t in p["targets"] for name in NAME.findall(t["expr"])}
    assert PANELS[title] <= used, f"{title}: missing {PANELS[title] - used}"


def test_latency_panels_show_percentiles() -> None:
    for title in ("Create → start latency", "Job duration"):
        (panel,) = [p for p in _panels() if p["title"] == title and p["type"] == "timeseries"]
        quantiles = {
            float(q)
            for t in panel["targets"]
            for q in re.findall(r"histogram_quantile\(([\d.]+)", t["expr"])
        }
        assert quantiles == {0.5, 0.95, 0.99}
        assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_grafana_provisioning_loads_the_dashboard() -> None:
    provisioning = OBSERVABILITY / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "orchestrix.yml")["providers"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    override = load_yaml(OBSERVABILITY / "compose.yaml")["services"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in override
    mounts = {}
    for volume in override["grafana"]["volumes"]:
        source, mounted = volume.split(":")[:2]
        mounts[source] = mounted
    target = mounts["./deploy/observability/grafana/orchestrix.json"]
    assert target.rsplit("/", 1)[0] == provider["options"]["path"]
