"""The alert rules (deploy/prometheus): valid for promtool, every alert unit-tested with promtool
(firing, and not firing below its threshold), the Kubernetes PrometheusRule the same rules, and every
metric they watch one the mesh exports (or a named exporter's)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.unit.test_deploy_manifests import of_kind, render

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "llmesh-rules.yml"
TESTS = REPO / "deploy" / "prometheus" / "llmesh-rules.test.yml"
EXPORTERS = {"kafka_consumergroup_lag"}  # Strimzi's Kafka Exporter


def promtool() -> str:
    """The promtool that `make test` links beside the interpreter (deploy/tools/install-promtool.sh)."""
    beside = Path(sys.executable).parent / "promtool"
    found = str(beside) if beside.exists() else shutil.which("promtool")
    assert found, "promtool is missing: run deploy/tools/install-promtool.sh .venv/bin (make test does)"
    return found


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool(), "test", "rules", str(TESTS)], capture_output=True, text=True, cwd=TESTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in _alerts():
        ours = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in ours), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in ours) or name in {"LlmeshConsumerLag", "LlmeshPolicyRolledBack"}, (
            f"{name}: no case where it stays quiet"
        )


def test_the_kubernetes_rule_is_the_same_rules():
    (rule,) = of_kind(render("cpu"), "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_every_metric_watched_is_exported_by_the_mesh():
    sources = "\n".join(p.read_text() for p in [*REPO.glob("services/**/*.py"), *REPO.glob("llmesh/**/*.py")])
    for name, rule in _alerts().items():
        for metric in set(re.findall(r"\b(llmesh_[a-z_]+|kafka_[a-z_]+)", rule["expr"])):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            assert base in EXPORTERS or f'"{base}"' in sources, f"{name} watches {metric}, which nothing exports"
