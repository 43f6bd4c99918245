"""deploy/observability/alerts.yml: promtool checks the rules and runs their unit
tests (alerts.test.yml: series that fire and series that don't), and every
series a rule names is one the services expose, with its labels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest

from tests.deploy.manifests import DEPLOY, load_yaml
from tests.deploy.test_observability import NAME, _metric_objects

ALERTS = DEPLOY / "observability" / "alerts.yml"
TESTS = DEPLOY / "observability" / "alerts.test.yml"


def _promtool() -> str:
    found = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent)
    )
    if found is None:
        if os.environ.get("ORX_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is required (ORX_REQUIRE_PROMTOOL=1) but was not found")
        pytest.skip("promtool not found (make test fetches it where apt-get is available)")
    return found


def _run(*args: str) -> str:
    done = subprocess.run(
        [_promtool(), *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS: 6 rules found" in _run("check", "rules", ALERTS.name)


def test_each_alert_fires_on_its_series_and_not_on_others() -> None:
    assert "SUCCESS" in _run("test", "rules", TESTS.name)


def test_every_alert_has_a_test_that_fires_it() -> None:
    alerts = {rule["alert"] for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]}
    fired = {
        case["alertname"]
        for test in load_yaml(TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in load_yaml(TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert alerts == fired == quiet


def test_every_series_a_rule_names_is_exposed_with_its_labels() -> None:
    exposed: dict[str, set[str]] = {}
    for metric in _metric_objects():
        labels = set(getattr(metric, "_labelnames", ()))
        for family in metric.describe():
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                exposed.setdefault(family.name + suffix, set()).update(labels)
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            promql_parser.parse(rule["expr"])  # raises on a syntax error
            for name in NAME.findall(rule["expr"]):
                assert name in exposed, f"{rule['alert']}: {name} is not exposed"
            names = NAME.findall(rule["expr"])
            for label in ("queue", "dependency"):
                if label in rule["expr"]:
                    assert any(label in exposed[n] for n in names), (rule["alert"], label)
