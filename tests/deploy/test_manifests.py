"""The Kubernetes manifests of deploy/k8s: valid objects that agree with the code.

Each kustomization (the base and every overlay) is rendered and every object is
validated against the Kubernetes OpenAPI schemas in strict mode (no unknown
fields), offline, with the schemas the kubernetes-validate package bundles. The
KEDA ScaledObject and TriggerAuthentication, custom resources those schemas do
not cover, get field checks instead. Then the manifests are checked against the
code: every variable they pass is one of shared/orchestrix/settings.py and
parses there, ports and probe paths are the ones the processes serve, grace
periods outlast the drain, KEDA connects to the workers' database as they do,
and its query, run on a migrated database, counts the jobs that need a worker.
"""

from __future__ import annotations

import asyncio
import configparser
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
from orchestrix import ids, status
from orchestrix.services.api import health
from orchestrix.settings import FILE_VARIABLES, Settings
from orchestrix.states import JobState

from tests.deploy.manifests import (
    DEPLOY,
    MIGRATE_ARGS,
    ROOT,
    SECRETS_DIR,
    SERVICES,
    TARGETS,
    VARIABLE_NAMES,
    Resource,
    component,
    data_of,
    environment,
    generated,
    load_yaml,
    named,
    namespace,
    nats_settings,
    of_kind,
    only_container,
    orchestrix_workloads,
    passed_names,
    pod_spec,
    port_number,
    process_environment,
    render,
    secret_files,
    selects,
    settings_of,
)

# The oldest Kubernetes these manifests claim (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is on by default from 1.27), and the newest the
# schemas of kubernetes-validate cover.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SECRET_VARIABLES = frozenset({"DATABASE_URL", "DB_PASSWORD", "NATS_PASSWORD"})
# KEDA's custom resources: no Kubernetes schema covers them (test_keda_*).
KEDA_KINDS = frozenset({"ScaledObject", "TriggerAuthentication"})
# The trigger metadata of KEDA's postgresql scaler. The password and a whole
# connection string are only ever authentication parameters (KEDA_PARAMETERS),
# or read from the target's environment (passwordFromEnv, connectionFromEnv).
KEDA_METADATA = frozenset(
    {
        "query",
        "targetQueryValue",
        "activationTargetQueryValue",
        "host",
        "port",
        "userName",
        "dbName",
        "sslmode",
        "passwordFromEnv",
        "connectionFromEnv",
    }
)
KEDA_PARAMETERS = frozenset({"password", "connection", "host", "port", "userName", "dbName"})
KEDA_TRIGGER = frozenset(
    {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
)
KEDA_SPEC = frozenset(
    {
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
)
# Extra PostgreSQL connections beside the pool (DB_POOL_MAX_SIZE): the scheduler's
# LISTEN connection (services/scheduler/service.py) and maintenance lock
# (services/scheduler/leader.py); the worker's lease renewals
# (services/worker/consumer.py).
EXTRA_CONNECTIONS = {"api": 0, "scheduler": 2, "worker": 1}
# KEDA's postgresql scaler, per trigger: its polling loop and the HPA's metric
# requests both run the query, and may overlap.
KEDA_CONNECTIONS = 2
POSTGRES_RESERVED_CONNECTIONS = 3  # superuser_reserved_connections' default

all_targets = pytest.mark.parametrize("target", list(TARGETS))


@pytest.fixture(scope="module", autouse=True)
def _schemas_parsed_once() -> Iterator[None]:
    """kubernetes-validate parses its schema files (1.2 MB of definitions) on every
    call; they are only read, so parse each once for this module: 3x faster."""
    utils = kubernetes_validate.utils
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
        yield


def _probe(container: dict[str, Any], kind: str) -> tuple[str, int]:
    probe = container[kind]["httpGet"]
    return probe["path"], port_number(container, probe["port"])


@all_targets
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(target: str, version: str) -> None:
    for resource in render(target):
        if resource["kind"] in KEDA_KINDS:
            continue  # a KEDA custom resource: test_keda_*
        where = f"{target}: {resource['kind']} {resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not a valid object for Kubernetes {version}:\n{exc}")


def test_strict_validation_rejects_unknown_fields() -> None:
    """The validation above would catch a misspelt field, not only a wrong type."""
    deployment = component(render("base"), "worker")
    broken = {**deployment, "spec": {**deployment["spec"], "terminationGracePeriod": 60}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@all_targets
def test_the_pieces_are_all_there(target: str) -> None:
    resources = render(target)
    kinds = sorted(r["kind"] for r in resources)
    for name in SERVICES:
        component(resources, name)
    component(resources, "migrate")
    named(resources, "Service", "orchestrix-api")
    named(resources, "HorizontalPodAutoscaler", "orchestrix-api")
    generated(resources, "ConfigMap", "orchestrix-config")
    generated(resources, "Secret", "orchestrix-db")
    budgets = [
        pdb
        for pdb in of_kind(resources, "PodDisruptionBudget")
        if pdb["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == "orchestrix"
    ]
    assert len(budgets) == 3, kinds
    if target != "base":
        assert named(resources, "Namespace", namespace(resources))


@all_targets
def test_settings_passed_exist_in_the_settings_module(target: str) -> None:
    """No drift: every variable a manifest sets is read by the code, and parses."""
    resources = render(target)
    for workload in orchestrix_workloads(resources):
        container = only_container(workload)
        unknown = passed_names(container, resources) - VARIABLE_NAMES
        assert not unknown, (
            f"{target}: {workload['metadata']['name']} passes {sorted(unknown)}, "
            "which shared/orchestrix/settings.py does not know"
        )
        # Raises SettingsError, naming the variable, for a value the process would refuse.
        settings_of(resources, workload)
    for config_map in of_kind(resources, "ConfigMap"):
        if config_map["metadata"]["name"].startswith("orchestrix-config"):
            assert set(config_map["data"]) <= VARIABLE_NAMES
            assert not set(config_map["data"]) & SECRET_VARIABLES, "a password in a ConfigMap"


@all_targets
def test_each_process_runs_its_command_from_one_image(target: str) -> None:
    resources = render(target)
    images = set()
    for name, args in {**SERVICES, "migrate": MIGRATE_ARGS}.items():
        container = only_container(component(resources, name))
        assert container["args"] == args
        assert "command" not in container, "the image's entrypoint is `orchestrix`"
        images.add(container["image"])
    assert len(images) == 1, f"the migration and every process must run one image: {images}"
    expected = {"base": "orchestrix", "local": "orchestrix:local"}
    if target in expected:
        assert images == {expected[target]}


def test_pods_run_as_the_image_user() -> None:
    """The uid in the Dockerfile's USER is the one the pods insist on."""
    user = re.search(r"^USER\s+(\d+):(\d+)\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user is not None, "the Dockerfile should set a numeric USER uid:gid"
    uid, gid = int(user.group(1)), int(user.group(2))
    for workload in orchestrix_workloads(render("base")):
        context = pod_spec(workload)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
        container = only_container(workload)["securityContext"]
        assert container["allowPrivilegeEscalation"] is False
        assert container["readOnlyRootFilesystem"] is True


@all_targets
def test_probes_check_the_process_and_readiness_its_dependencies(target: str) -> None:
    resources = render(target)
    api_paths = {route.path for route in health.routes if hasattr(route, "path")}
    assert {"/health", "/ready", "/metrics"} <= api_paths
    for name in SERVICES:
        workload = component(resources, name)
        container = only_container(workload)
        settings = settings_of(resources, workload)
        port = settings.api.port if name == "api" else settings.metrics.port
        assert [p["containerPort"] for p in container["ports"]] == [port]
        # Liveness (and startup, while the process connects): /health, the process only.
        assert _probe(container, "livenessProbe") == ("/health", port)
        assert _probe(container, "startupProbe") == ("/health", port)
        # Readiness: /ready, which checks PostgreSQL (and NATS, except for the API)
        # and fails while draining.
        assert _probe(container, "readinessProbe") == ("/ready", port)
        # /ready waits up to READY_TIMEOUT_S for PostgreSQL: the probe must wait longer.
        assert container["readinessProbe"]["timeoutSeconds"] > status.READY_TIMEOUT_S
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"


@all_targets
def test_grace_period_outlasts_the_drain(target: str) -> None:
    resources = render(target)
    for name in SERVICES:
        workload = component(resources, name)
        container = only_container(workload)
        settings = settings_of(resources, workload)
        # The API drains for API_SHUTDOWN_TIMEOUT, the others for SHUTDOWN_TIMEOUT.
        drain = (settings.api if name == "api" else settings.worker).shutdown_timeout_s
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        command = pre_stop.get("command", [])
        sleep = float(command[1]) if command[:1] == ["sleep"] else 0.0
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace >= sleep + drain + 10, (
            f"{target}: {name} gets {grace}s to stop, but may take {sleep}s before SIGTERM "
            f"and {drain}s to drain"
        )


@all_targets
def test_every_container_requests_resources(target: str) -> None:
    for workload in (
        of_kind(render(target), "Deployment")
        + of_kind(render(target), "StatefulSet")
        + of_kind(render(target), "Job")
    ):
        for container in pod_spec(workload)["containers"]:
            resources = container.get("resources", {})
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


@all_targets
def test_services_and_budgets_select_the_pods(target: str) -> None:
    resources = render(target)
    workloads = of_kind(resources, "Deployment") + of_kind(resources, "StatefulSet")
    for service in of_kind(resources, "Service"):
        if service["spec"].get("type") == "ExternalName":
            continue
        chosen = [
            w
            for w in workloads
            if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {len(chosen)}"
        container = pod_spec(chosen[0])["containers"][0]
        for port in service["spec"]["ports"]:
            port_number(container, port.get("targetPort", port["port"]))
    for name in SERVICES:
        deployment = component(resources, name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [
            pdb
            for pdb in of_kind(resources, "PodDisruptionBudget")
            if selects(pdb["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets"
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)


@all_targets
def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(target: str) -> None:
    resources = render(target)
    hpa = named(resources, "HorizontalPodAutoscaler", "orchestrix-api")
    target_ref = hpa["spec"]["scaleTargetRef"]
    api = named(resources, target_ref["kind"], target_ref["name"])
    assert api is component(resources, "api")
    assert "replicas" not in api["spec"], "the HPA owns the API's replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization is measured against the request.
    assert "cpu" in only_container(api)["resources"]["requests"]
    worker = component(resources, "worker")
    if of_kind(resources, "ScaledObject"):
        assert "replicas" not in worker["spec"], "KEDA owns the workers' replica count"
    elif target != "base":
        assert worker["spec"]["replicas"] >= 1


def _keda_trigger(resources: list[Resource]) -> dict[str, Any]:
    (scaled,) = of_kind(resources, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert isinstance(trigger, dict)
    return trigger


def test_keda_scaled_object() -> None:
    resources = render("production")
    (scaled,) = of_kind(resources, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= KEDA_SPEC, f"unknown ScaledObject fields {set(spec) - KEDA_SPEC}"
    reference = spec["scaleTargetRef"]
    worker = component(resources, "worker")
    assert reference.get("kind", "Deployment") == "Deployment"
    assert reference.get("apiVersion", "apps/v1") == "apps/v1"
    assert reference["name"] == worker["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert isinstance(spec["pollingInterval"], int)

    trigger = _keda_trigger(resources)
    assert set(trigger) <= KEDA_TRIGGER, f"unknown trigger fields {set(trigger) - KEDA_TRIGGER}"
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_METADATA, f"unknown metadata {set(metadata) - KEDA_METADATA}"
    assert {"query", "targetQueryValue"} <= set(metadata)
    # KEDA's metadata is a map of strings: a YAML number there is refused by the CRD.
    assert all(isinstance(value, str) for value in metadata.values()), metadata
    assert float(metadata.get("activationTargetQueryValue", "0")) >= 0
    # The query's value is the jobs needing a worker slot (test_keda_query_counts_*),
    # and KEDA asks for ceil(value / targetQueryValue) workers: one slot per job.
    settings = settings_of(resources, worker)
    assert float(metadata["targetQueryValue"]) == settings.worker.concurrency

    # The scaling behaviour is an HPA's: validate it as one.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    as_hpa: Resource = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-check"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(as_hpa, KUBERNETES_VERSIONS[0], strict=True)


def _keda_parameters(resources: list[Resource], trigger: dict[str, Any]) -> dict[str, str]:
    """What KEDA's postgresql scaler connects with: the trigger's metadata, then
    the TriggerAuthentication's parameters read from their Secrets (which win)."""
    parameters: dict[str, str] = dict(trigger["metadata"])
    reference = trigger["authenticationRef"]
    assert reference.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    authentication = named(resources, "TriggerAuthentication", reference["name"])
    assert authentication["apiVersion"] == "keda.sh/v1alpha1"
    assert set(authentication["spec"]) == {"secretTargetRef"}
    for target in authentication["spec"]["secretTargetRef"]:
        assert set(target) == {"parameter", "name", "key"}, target
        assert target["parameter"] in KEDA_PARAMETERS, target
        # The exact name: a reference kustomize did not rename with the generated
        # Secret's hash names nothing (kustomizeconfig.yaml in deploy/k8s/keda).
        parameters[target["parameter"]] = data_of(named(resources, "Secret", target["name"]))[
            target["key"]
        ]
    return parameters


def test_keda_connects_as_the_workers_do_but_as_the_read_only_role() -> None:
    resources = render("production")
    parameters = _keda_parameters(resources, _keda_trigger(resources))
    worker = component(resources, "worker")
    env = process_environment(resources, worker)
    # The manifests give the DB_* parts (docs/deploy.md: a whole DATABASE_URL
    # would be KEDA's `connection` parameter instead).
    assert "DATABASE_URL" not in env
    assert "connection" not in parameters
    # KEDA's own role and Secret, never the processes' read-write credentials.
    assert parameters["userName"] == KEDA_ROLE
    assert (
        parameters["password"]
        == data_of(generated(resources, "Secret", "orchestrix-keda"))["KEDA_DB_PASSWORD"]
    )
    trigger_auth = named(resources, "TriggerAuthentication", "orchestrix-postgres")
    for target in trigger_auth["spec"]["secretTargetRef"]:
        assert not target["name"].startswith("orchestrix-db"), "KEDA uses the processes' Secret"

    url = urlsplit(settings_of(resources, worker).database.url)
    assert parameters["userName"] != unquote(url.username or "")
    # The `postgres` Service by its full name: KEDA's operator runs in its own namespace.
    assert parameters["host"] == f"{url.hostname}.{namespace(resources)}.svc.cluster.local"
    postgres = named(resources, "Service", str(url.hostname))
    assert [p["port"] for p in postgres["spec"]["ports"]] == [url.port]
    assert int(parameters["port"]) == url.port
    assert parameters["dbName"] == unquote(url.path.lstrip("/"))
    assert [parameters["sslmode"]] == parse_qs(url.query)["sslmode"]


KEDA_ROLE = "orchestrix_keda"
KEDA_ROLE_SQL = DEPLOY / "postgres" / "keda-role.sql"


async def test_the_keda_role_reads_only_what_the_query_needs(
    pool: asyncpg.Pool, database: str
) -> None:
    """deploy/postgres/keda-role.sql, run with psql as documented: the role runs
    KEDA's query and nothing else (no payloads, no writes)."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql not found (Debian's postgresql-client)")
    for _ in range(2):  # idempotent: a second run changes nothing and fails on nothing
        done = await asyncio.to_thread(
            subprocess.run,
            [psql, database, "-X", "-q", "-v", "keda_password=k3da-pw", "-f", str(KEDA_ROLE_SQL)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    await _insert(pool, JobState.PENDING, -60, 3)
    query = _keda_trigger(render("production"))["metadata"]["query"]
    keda = await asyncpg.connect(database, user=KEDA_ROLE, password="k3da-pw")
    try:
        assert await keda.fetchval(query) == 3
        for statement in (
            "SELECT payload FROM jobs",
            "SELECT * FROM jobs",
            "SELECT count(*) FROM job_events",
            "UPDATE jobs SET priority = 1",
            "DELETE FROM jobs",
        ):
            with pytest.raises(
                (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
            ):
                await keda.execute(statement)
    finally:
        await keda.close()


def test_only_the_services_reach_postgres_and_nats() -> None:
    """Where PostgreSQL or NATS run in the cluster, a NetworkPolicy admits only the
    Orchestrix pods to their client ports (and a cluster's own nodes to its routes)."""
    orchestrix = {"app.kubernetes.io/name": "orchestrix"}
    for target, servers in (
        ("local", {"postgres-local": 5432, "nats-local": 4222}),
        ("production-nats-cluster", {"nats-cluster": 4222}),
    ):
        resources = render(target)
        policies = of_kind(resources, "NetworkPolicy")
        for name, port in servers.items():
            server = named(resources, "StatefulSet", name)
            labels = server["spec"]["template"]["metadata"]["labels"]
            mine = [
                p
                for p in policies
                if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            ]
            assert mine, f"{target}: no NetworkPolicy selects {name}"
            (policy,) = mine
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            rules = policy["spec"]["ingress"]
            client = [r for r in rules if {"port": port, "protocol": "TCP"} in r["ports"]]
            assert len(client) == 1, (target, name)
            assert client[0]["from"] == [{"podSelector": {"matchLabels": orchestrix}}]
            for rule in rules:
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, "no namespace or IP blocks"
                    selected = peer["podSelector"]["matchLabels"]
                    assert selected in (orchestrix, {**labels})
            # Every Orchestrix pod carries the label the policy admits.
            for workload in ("api", "scheduler", "worker", "migrate"):
                pod_labels = component(resources, workload)["spec"]["template"]["metadata"]
                assert orchestrix.items() <= pod_labels["labels"].items()


def test_nats_runs_with_authentication_in_kubernetes() -> None:
    for target in ("local", "production-nats-cluster"):
        resources = render(target)
        secret = data_of(generated(resources, "Secret", "orchestrix-nats"))
        for workload in ("api", "scheduler", "worker"):
            env = process_environment(resources, component(resources, workload))
            assert env["NATS_USER"] == "orchestrix"
            assert env["NATS_PASSWORD"] == secret["NATS_PASSWORD"]
        servers = [s for s in of_kind(resources, "StatefulSet") if "nats" in s["metadata"]["name"]]
        assert servers
        for server in servers:
            (env,) = [
                e for e in only_container(server)["env"] if e["name"] == "ORCHESTRIX_NATS_PASSWORD"
            ]
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["key"] == "NATS_PASSWORD"
            assert (
                ref["name"] == generated(resources, "Secret", "orchestrix-nats")["metadata"]["name"]
            )


# (state, run_at in seconds from now, whether the job needs a worker slot now)
JOBS = [
    (JobState.PENDING, -60, True),
    (JobState.PENDING, 3600, False),  # not due yet
    (JobState.RETRYING, -1, True),
    (JobState.RETRYING, 60, False),  # backing off
    (JobState.RUNNING, -60, True),
    (JobState.SUCCEEDED, -60, False),
    (JobState.FAILED, -60, False),
    (JobState.CANCELLED, -60, False),
    (JobState.CANCELLED, 3600, False),
]


async def _insert(pool: asyncpg.Pool, state: JobState, run_in_s: float, count: int) -> None:
    """``count`` jobs in ``state``, with the columns that state carries."""
    attempt = 0 if state is JobState.PENDING else 1
    await pool.execute(
        """
        INSERT INTO jobs (id, type, state, attempt, run_at, scheduled_at, started_at,
                          lease_expires_at, completed_at)
        SELECT unnest($1::text[]), 'keda', $2, $3, now() + make_interval(secs => $4),
               CASE WHEN $2 = 'RUNNING' THEN now() END,
               CASE WHEN $2 = 'RUNNING' THEN now() END,
               CASE WHEN $2 = 'RUNNING' THEN now() + interval '30 seconds' END,
               CASE WHEN $2 IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN now() END
        """,
        [ids.new_id() for _ in range(count)],
        str(state),
        attempt,
        run_in_s,
    )


async def test_keda_query_counts_the_jobs_that_need_a_worker_slot(pool: asyncpg.Pool) -> None:
    """The trigger's query, run as KEDA runs it, on the migrated schema."""
    query = _keda_trigger(render("production"))["metadata"]["query"]
    assert await pool.fetchval(query) == 0
    # Row i gets 2**i jobs: the count then says exactly which rows were counted.
    for i, (state, run_in_s, _) in enumerate(JOBS):
        await _insert(pool, state, run_in_s, 2**i)
    counted = await pool.fetchval(query)
    expected = sum(2**i for i, (_, _, needs_slot) in enumerate(JOBS) if needs_slot)
    wrong = [
        f"{state} due in {run_in_s}s"
        for i, (state, run_in_s, _) in enumerate(JOBS)
        if (counted ^ expected) >> i & 1
    ]
    assert counted == expected, f"miscounted: {wrong}"
    # Due jobs with a concurrency key or a rate limit are in indexes of their own.
    await pool.execute(
        "INSERT INTO jobs (id, type, concurrency_key, rate_limit) VALUES "
        "('0000000000000000000000KEY1', 't', 'k', NULL), "
        "('0000000000000000000000KEY2', 't', 'k', 'r'), "
        "('000000000000000000000RATE1', 't', NULL, 'r')"
    )
    assert await pool.fetchval(query) == expected + 3


async def test_keda_query_stays_off_the_finished_jobs(pool: asyncpg.Pool) -> None:
    """Every part of the count reads an index, never the table of finished jobs."""
    query = _keda_trigger(render("production"))["metadata"]["query"]
    await pool.execute(
        "INSERT INTO jobs (id, type, state, attempt, completed_at) "
        "SELECT lpad(n::text, 26, '0'), 't', 'SUCCEEDED', 1, now() "
        "FROM generate_series(1, 20000) AS n"
    )
    await _insert(pool, JobState.PENDING, -1, 10)
    await pool.execute("ANALYZE jobs")
    plan = "\n".join(row[0] for row in await pool.fetch("EXPLAIN " + query))
    assert "Seq Scan" not in plan, plan
    assert plan.count("Index Only Scan") == 4, plan


def test_keda_query_names_only_states_that_exist() -> None:
    """A state the schema no longer has counts nothing, silently: name none."""
    query = _keda_trigger(render("production"))["metadata"]["query"]
    named_states = set(re.findall(r"'([A-Z_]+)'", query))
    assert named_states, query
    assert named_states <= {state.value for state in JobState}, query


@all_targets
def test_dependencies_are_the_services_the_settings_name(target: str) -> None:
    resources = render(target)
    settings = settings_of(resources, component(resources, "api"))
    env = process_environment(resources, component(resources, "api"))
    postgres = named(resources, "Service", env["DB_HOST"])
    assert [p["port"] for p in postgres["spec"]["ports"]] == [int(env.get("DB_PORT", "5432"))]
    for server in settings.nats.servers:
        url = urlsplit(server)
        service = _nats_service(resources, str(url.hostname))
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert ports["client"] == (url.port or 4222), server
        assert ports["monitoring"] == 8222, server
    # The `nats` alias is there whatever NATS_URL names (tools, docs/deploy.md).
    nats = named(resources, "Service", "nats")
    for service in (postgres, nats):
        assert service["spec"]["type"] == "ExternalName"
        external = service["spec"]["externalName"]
        if target == "base":
            assert external.endswith(".invalid"), "the base only has placeholders"
        else:
            assert not external.endswith(".invalid"), f"{target} must say where it is"


def _nats_service(resources: list[Resource], host: str) -> Resource:
    """The Service a NATS_URL host names: the Service of that name, or, for pod N
    of a StatefulSet (by its name under the headless Service), that Service."""
    if any(s["metadata"]["name"] == host for s in of_kind(resources, "Service")):
        return named(resources, "Service", host)
    pod, _, service_name = host.partition(".")
    service = named(resources, "Service", service_name)
    assert service["spec"].get("clusterIP") == "None", f"{host}: {service_name} is not headless"
    (statefulset,) = [
        s for s in of_kind(resources, "StatefulSet") if s["spec"]["serviceName"] == service_name
    ]
    name, _, ordinal = pod.rpartition("-")
    assert name == statefulset["metadata"]["name"], f"{host} is no pod of {name}"
    assert 0 <= int(ordinal) < statefulset["spec"]["replicas"], f"{host}: no such pod"
    return service


def test_local_overlay_runs_its_own_servers() -> None:
    resources = render("local")
    space = namespace(resources)
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    for alias, server in (("postgres", "postgres-local"), ("nats", "nats-local")):
        external = named(resources, "Service", alias)
        assert external["spec"]["externalName"] == f"{server}.{space}.svc.cluster.local"
        service = named(resources, "Service", server)
        assert [p["port"] for p in service["spec"]["ports"]] == [
            p["port"] for p in external["spec"]["ports"]
        ]
        statefulset = named(resources, "StatefulSet", server)
        container = only_container(statefulset)
        assert container["image"] == compose[alias]["image"], "the same server as compose"

    # The local PostgreSQL's user, database and password are the processes' ones.
    api_env = process_environment(resources, component(resources, "api"))
    postgres_env = process_environment(resources, named(resources, "StatefulSet", "postgres-local"))
    assert postgres_env["POSTGRES_USER"] == api_env["DB_USER"]
    assert postgres_env["POSTGRES_DB"] == api_env["DB_NAME"]
    assert postgres_env["POSTGRES_PASSWORD"] == api_env["DB_PASSWORD"]
    assert api_env["DB_PASSWORD"] != "CHANGE-ME"
    assert Settings.from_env(api_env).database.url.endswith("sslmode=disable")


def test_local_nats_is_configured_like_compose() -> None:
    resources = render("local")
    compose_conf = (DEPLOY / "nats" / "nats.conf").read_text()
    (config,) = [
        c for c in of_kind(resources, "ConfigMap") if c["metadata"]["name"].startswith("nats-local")
    ]
    (local_conf,) = config["data"].values()
    assert nats_settings(local_conf) == nats_settings(compose_conf)
    settings = nats_settings(local_conf)
    assert "sync_interval: always" in settings
    assert "http_port: 8222" in settings
    container = only_container(named(resources, "StatefulSet", "nats-local"))
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (key,) = config["data"]
    assert container["args"][-1] == f"{mount['mountPath']}/{key}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": 4222, "monitoring": 8222}
    store = next(line for line in settings if line.startswith("store_dir"))
    assert any(m["mountPath"] == store.split(":", 1)[1].strip() for m in container["volumeMounts"])


def _max_replicas(resources: list[Resource], name: str) -> int:
    workload = component(resources, name)
    for hpa in of_kind(resources, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]:
            return int(hpa["spec"]["maxReplicas"])
    for scaled in of_kind(resources, "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]:
            return int(scaled["spec"]["maxReplicaCount"])
    return int(workload["spec"]["replicas"])


def connection_budget(resources: list[Resource]) -> int:
    """PostgreSQL connections of every Orchestrix process (and of KEDA's trigger,
    where there is one) at the largest scale."""
    total = 1  # the migration Job: one connection, no pool
    for name in SERVICES:
        pool = settings_of(resources, component(resources, name)).database.pool_max_size
        total += _max_replicas(resources, name) * (pool + EXTRA_CONNECTIONS[name])
    for scaled in of_kind(resources, "ScaledObject"):
        triggers = scaled["spec"]["triggers"]
        total += KEDA_CONNECTIONS * sum(t["type"] == "postgresql" for t in triggers)
    return total


def test_local_postgres_has_room_for_every_process() -> None:
    resources = render("local")
    container = only_container(named(resources, "StatefulSet", "postgres-local"))
    options = configparser.ConfigParser()
    options.read_string("[postgres]\n" + "\n".join(container["args"][1::2]))
    allowed = int(options["postgres"]["max_connections"])
    budget = connection_budget(resources)
    assert budget <= allowed - POSTGRES_RESERVED_CONNECTIONS, (
        f"at full scale the processes open {budget} connections; the local "
        f"PostgreSQL allows {allowed}"
    )


def test_production_connection_budget_is_documented() -> None:
    """docs/deploy.md states the production overlay's budget: keep it true."""
    budget = connection_budget(render("production"))
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"**{budget}** connections" in text, f"docs/deploy.md should state {budget}"


def test_migration_job() -> None:
    for target in TARGETS:
        job = component(render(target), "migrate")
        spec = job["spec"]
        assert pod_spec(job)["restartPolicy"] == "Never"
        assert spec["backoffLimit"] >= 3, "retry while PostgreSQL comes up"
        assert spec["ttlSecondsAfterFinished"] > 0, "a finished Job blocks the next image"


def test_secrets_hold_only_credentials() -> None:
    for target in TARGETS:
        secret = generated(render(target), "Secret", "orchestrix-db")
        assert set(secret["data"]) <= SECRET_VARIABLES
    local = process_environment(render("local"), component(render("local"), "worker"))
    assert local["DB_PASSWORD"] == "orchestrix-local"


# nats-server reads a password from its configuration or its environment only,
# never from a file: the one Secret value any container gets as a variable.
SECRET_ENV_ALLOWED = frozenset({("nats", "ORCHESTRIX_NATS_PASSWORD")})


@all_targets
def test_secrets_reach_the_processes_as_mounted_files_only(target: str) -> None:
    """No Secret value in a ConfigMap or in a variable: every Orchestrix process
    reads its passwords from files of Secret volumes (DB_PASSWORD_FILE,
    NATS_PASSWORD_FILE), readable by its group only; and every NAME_FILE of any
    container names a file of a Secret it mounts (process_environment checks)."""
    resources = render(target)
    values = {
        value
        for secret in of_kind(resources, "Secret")
        for value in data_of(secret).values()
        if value
    }
    assert values, "the overlays carry placeholders or development values"
    for config_map in of_kind(resources, "ConfigMap"):
        for key, text in config_map["data"].items():
            name = config_map["metadata"]["name"]
            if key in FILE_VARIABLES:
                # NATS_URL is a secret only when it holds credentials.
                assert key == "NATS_URL", f"{name} holds {key}, a secret"
                assert "@" not in text, f"{name}: NATS_URL holds credentials"
            for value in values:
                assert value not in text, f"ConfigMap {name} ({key}) holds a Secret value"
    for workload in (
        of_kind(resources, "Deployment")
        + of_kind(resources, "StatefulSet")
        + of_kind(resources, "Job")
    ):
        for container in pod_spec(workload)["containers"]:
            where = f"{target}: {workload['metadata']['name']}/{container['name']}"
            sources = container.get("envFrom", [])
            assert not [s for s in sources if "secretRef" in s], f"{where}: a Secret as variables"
            for variable in container.get("env", []):
                if "secretKeyRef" in variable.get("valueFrom", {}):
                    allowed = (container["name"], variable["name"]) in SECRET_ENV_ALLOWED
                    assert allowed, f"{where}: {variable['name']} is a Secret value in a variable"
                assert str(variable.get("value", "")) not in values, f"{where}: a literal secret"
        if len(pod_spec(workload)["containers"]) == 1:
            process_environment(resources, workload)  # each NAME_FILE is a Secret's file
    for workload in orchestrix_workloads(resources):
        name = workload["metadata"]["name"]
        env = environment(resources, only_container(workload))
        secrets_given = set(env) & set(FILE_VARIABLES) - {"NATS_URL"}
        assert not secrets_given, f"{name}: {secrets_given} as variables"
        files = secret_files(resources, workload)
        for variable in ("DB_PASSWORD_FILE", "NATS_PASSWORD_FILE"):
            assert env[variable].startswith(f"{SECRETS_DIR}/"), (name, variable)
            assert env[variable] in files, (name, variable)
        resolved = process_environment(resources, workload)
        assert (
            resolved["DB_PASSWORD"]
            == data_of(generated(resources, "Secret", "orchestrix-db"))["DB_PASSWORD"]
        )
        context = pod_spec(workload)["securityContext"]
        assert context["fsGroup"] == context["runAsGroup"], f"{name}: the files' group"
        for volume in pod_spec(workload)["volumes"]:
            if "secret" in volume:
                mode = volume["secret"]["defaultMode"]
                assert mode & 0o007 == 0, f"{name}: {volume['name']} is world-readable"
