"""deploy/k8s: both overlays render with kustomize (kubectl), every core resource passes the
Kubernetes schema strictly, and the manifests agree with the code (topics, groups, ports, probes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llmesh.common import topics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBERNETES = "1.31"
CUSTOM = {"KafkaTopic", "ScaledObject", "PodMonitor", "PrometheusRule"}  # CRDs of Strimzi, KEDA, prometheus-operator
SERVICES = {"gateway": 50051, "tokenize": 50052, "infer": 50053, "eval": 50054}
GATEWAY_HTTP = 8080  # the gateway's OpenAI-compatible HTTP API


def kubectl() -> str:
    """The kubectl that `make test` installs beside the interpreter (deploy/tools/install-kubectl.sh)."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: run deploy/tools/install-kubectl.sh .venv/bin (make test does)"
    return found


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_every_core_resource_passes_the_kubernetes_schema_strictly(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    for doc in docs:
        if doc["kind"] not in CUSTOM:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        assert doc["metadata"].get("namespace", "llmesh") == "llmesh"


def test_a_misspelled_field_is_caught():
    deployment = json.loads(json.dumps(of_kind(render("cpu"), "Deployment")["gateway"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_service_has_grpc_probes_a_service_a_disruption_budget_and_runs_as_non_root(overlay):
    docs = render(overlay)
    deployments, services, budgets = of_kind(docs, "Deployment"), of_kind(docs, "Service"), of_kind(docs, "PodDisruptionBudget")
    assert set(deployments) == set(SERVICES)
    for name, port in SERVICES.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == f"llmesh/{name}:{metadata.version('llmesh')}", "the image build-images.sh makes"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name} {probe}"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LLMESH_GRPC_PORT"] == str(port)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > 30, "longer than the drain (LLMESH_DRAIN_SECONDS)"
        assert {p["port"] for p in services[name]["spec"]["ports"]} >= {port}
        assert budgets[name]["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_clients_reach_the_gateways_http_api(overlay):
    """Port 8080 (named http) listens on all interfaces, is a port of the Service, and the
    NetworkPolicy that admits clients to the gateway admits it besides gRPC."""
    docs = render(overlay)
    container = of_kind(docs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMESH_HTTP_PORT"] == str(GATEWAY_HTTP) and env["LLMESH_HTTP_HOST"] == "0.0.0.0"
    assert {"name": "http", "containerPort": GATEWAY_HTTP} in container["ports"]
    ports = {p["name"]: p for p in of_kind(docs, "Service")["gateway"]["spec"]["ports"]}
    assert ports["http"]["port"] == GATEWAY_HTTP and ports["http"]["targetPort"] == "http"
    assert ports["http"]["appProtocol"] == "http"
    (rule,) = of_kind(docs, "NetworkPolicy")["gateway-from-clients"]["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {SERVICES["gateway"], GATEWAY_HTTP}
    for name in set(SERVICES) - {"gateway"}:  # the other services serve no HTTP API
        other = of_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        assert GATEWAY_HTTP not in {p["containerPort"] for p in other["ports"]}


def test_the_kafka_topics_are_the_meshs_topics():
    declared = {
        t["spec"]["topicName"]: (t["spec"]["partitions"], t["spec"]["config"].get("cleanup.policy") == "compact")
        for t in of_kind(render("cpu"), "KafkaTopic").values()
    }
    assert declared == {t.name: (t.partitions, t.compacted) for t in topics.TOPICS}


def test_autoscaling_follows_the_lag_of_the_consumer_groups_the_code_uses():
    scaled = of_kind(render("cpu"), "ScaledObject")
    triggers = {name: s["spec"]["triggers"][0]["metadata"] for name, s in scaled.items()}
    assert triggers["infer"]["consumerGroup"] == topics.GROUP_INFER
    assert triggers["infer"]["topic"] == topics.INFER_REQUESTS
    assert triggers["tokenize"]["consumerGroup"] == topics.GROUP_TOKENIZE
    assert triggers["tokenize"]["topic"] == topics.GENERATE_REQUESTS


def test_only_the_gpu_overlay_asks_for_a_gpu():
    for overlay, kind in (("cpu", "KIND_CPU"), ("gpu", "KIND_GPU")):
        infer = of_kind(render(overlay), "Deployment")["infer"]["spec"]["template"]["spec"]
        container = infer["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LLMESH_INSTANCE_KIND"] == kind
        assert json.loads(env["LLMESH_TRITON_COMMAND"])[0] == "tritonserver", "infer runs and supervises Triton"
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == ("1" if overlay == "gpu" else None)
        assert ("nodeSelector" in infer) == (overlay == "gpu")


def test_the_dashboard_shows_what_operators_watch():
    dashboard = of_kind(render("cpu"), "ConfigMap")
    (data,) = [d["data"]["llmesh-dashboard.json"] for name, d in dashboard.items() if name.startswith("llmesh-grafana-dashboard")]
    titles = " ".join(p["title"].lower() for p in json.loads(data)["panels"])
    for what in ("latency", "throughput", "error", "tokens", "lag", "swaps", "shadow agreement", "pending approval"):
        assert what in titles


def test_the_strimzi_example_logs_each_service_in_as_its_own_kafka_user():
    """deploy/k8s/examples/strimzi: TLS + SCRAM-SHA-512 settings that KafkaSettings accepts, one
    KafkaUser per service whose Secret holds the password, and the consumer groups the code uses."""
    from llmesh.common.settings import KafkaSettings

    out = subprocess.run([kubectl(), "kustomize", str(K8S / "examples" / "strimzi")], capture_output=True, text=True, check=True)
    docs = tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)
    for doc in docs:
        if doc["kind"] not in CUSTOM | {"KafkaUser"}:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    config = of_kind(docs, "ConfigMap")["llmesh-config"]["data"]
    users = of_kind(docs, "KafkaUser")
    for name, pod in ((n, d["spec"]["template"]["spec"]) for n, d in of_kind(docs, "Deployment").items()):
        container = pod["containers"][0]
        env = {
            e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "KAFKA" in e["name"]
        }
        kafka_env = {k: v for k, v in (config | env).items() if k.startswith("LLMESH_KAFKA__")}
        settings = KafkaSettings(**{k.removeprefix("LLMESH_KAFKA__").lower(): v for k, v in kafka_env.items()})
        assert settings.security_protocol == "SASL_SSL" and settings.sasl_mechanism == "SCRAM-SHA-512"
        assert settings.sasl_username == f"llmesh-{name}" == settings.sasl_password.get_secret_value()  # the user's Secret
        assert users[settings.sasl_username]["spec"]["authentication"]["type"] == "scram-sha-512"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert str(settings.ssl_cafile.parent) in mounts, f"{name} mounts the cluster CA"
    groups = {
        name: {a["resource"]["name"] for a in u["spec"]["authorization"]["acls"] if a["resource"]["type"] == "group"}
        for name, u in users.items()
    }
    assert groups["llmesh-tokenize"] == {topics.GROUP_TOKENIZE} and groups["llmesh-infer"] == {topics.GROUP_INFER}
    assert groups["llmesh-eval"] == {topics.GROUP_EVAL} and not groups["llmesh-gateway"]


def test_the_audit_topic_is_never_compacted_and_kept_for_ever():
    (audit,) = [t for t in of_kind(render("cpu"), "KafkaTopic").values() if t["spec"]["topicName"] == topics.AUDIT]
    assert audit["spec"]["config"] == {"retention.ms": -1}
    (spec,) = [t for t in topics.TOPICS if t.name == topics.AUDIT]
    assert (spec.compacted, spec.retention_ms) == (False, -1)


def test_the_release_policy_is_valid_for_both_services_and_mounted_where_they_read_it(tmp_path: Path):
    """One ConfigMap: eval validates all of it (promotion), infer reads its approval gates."""
    from llmesh.common.approval import Governance
    from services.eval.policy import PromotionPolicy

    docs = render("cpu")
    (policy,) = [d["data"]["policy.yaml"] for name, d in of_kind(docs, "ConfigMap").items() if name.startswith("llmesh-policy")]
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    PromotionPolicy.load(path)
    assert Governance.load(path).approval.modes == ["swap", "canary"], "production gates swaps and large canaries"
    for name in ("infer", "eval"):
        (container,) = of_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][:1]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert env["LLMESH_POLICY_FILE"] == "/etc/llmesh/policy.yaml" and mounts["/etc/llmesh"] == "policy"
