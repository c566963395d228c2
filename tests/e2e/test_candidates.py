"""Shadow and canary candidates, scored by eval against the primary, promoted or removed by the
policy, automatically, under live load, with zero failed client requests. Each test releases a model
of its own (a primary v1 and a candidate v2), so none depends on another or on their order."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from llmesh import client
from llmesh.common.audit import AuditAction, AuditSource
from llmesh.common.events import ReleaseMode
from llmesh.lm.build import BAD_RECIPE, build_model
from llmesh.loadgen import GatewayLoad, wait_for_primary
from llmesh.v1 import common_pb2, eval_pb2, eval_pb2_grpc, gateway_pb2
from tests.e2e.gateways import audit_entries

pytestmark = pytest.mark.slow
PROMPTS = [f"{p} {i}" for i in range(5) for p in ("Return the number of", "This module provides", "Create a new")]


@pytest.fixture(scope="module")
def bad_model(models_dir: Path) -> Path:
    target = models_dir / "chat-bad"
    if not (target / "model.safetensors").exists():
        build_model(BAD_RECIPE, target)
    return target


def _release(mesh, version: int, artifacts: Path, mode: ReleaseMode, share: int = 100, *, model: str) -> None:
    event = client.release_for(model, version, artifacts, mode=mode, share_percent=share)
    asyncio.run(client.publish_release(mesh.address("broker"), event))


def _with_candidate(mesh, gateway, models_dir: Path, model: str, candidate: Path, mode: ReleaseMode, share: int) -> None:
    """`model` serving chat-v1 as v1, with `candidate` as v2 in `mode` at `share` percent."""
    _release(mesh, 1, models_dir / "chat-v1", ReleaseMode.SWAP, model=model)
    wait_for_primary(gateway, model, 1, timeout=120)
    _release(mesh, 2, candidate, mode, share, model=model)
    _routing_candidate(gateway, model, 2)


def _routing_candidate(gateway, model: str, version: int, timeout: float = 120) -> None:
    """Wait until `version` is loaded and registered as the candidate (state READY, reason says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)
        record = {v.version: v for v in info.versions}.get(version)
        if record and record.state == common_pb2.VERSION_STATE_READY and "candidate" in record.reason:
            return
        time.sleep(0.05)
    raise TimeoutError(f"v{version} never became a candidate")


def _answers(gateway, model: str) -> list[tuple[str, int]]:
    out = []
    for i, prompt in enumerate(PROMPTS[:10]):
        sampling = common_pb2.SamplingParams(max_tokens=12, seed=1000 + i, temperature=0.8)
        reply = gateway.Generate(gateway_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling), timeout=30)
        out.append((reply.text, reply.version))
    return out


def _candidate_stats(mesh, model: str) -> eval_pb2.CandidateStats | None:
    with grpc.insecure_channel(mesh.address("eval")) as channel:
        report = eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(model=model), timeout=10)
    return report.candidates[0] if report.candidates else None


def _decision_under_load(
    mesh, gateway, model: str, version: int, state: int, timeout: float = 120
) -> tuple[gateway_pb2.ModelVersionInfo, list]:
    """Run live load until the policy has acted on `version` (it reaches `state`); return its record."""
    with GatewayLoad(mesh.address("gateway"), model, clients=4, max_tokens=12) as load:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)
            record = {v.version: v for v in info.versions}[version]
            if record.state == state:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"no policy decision on v{version} within {timeout:.0f}s: {_candidate_stats(mesh, model)}")
        time.sleep(1)
    assert load.run.samples and load.run.errors == [], f"failed requests: {load.run.errors[:3]}"
    assert all(len(s.versions) == 1 for s in load.run.samples)
    return record, [h for h in info.history if h.version == version]


def test_shadow_at_100_percent_changes_no_answer_and_every_mirror_is_scored(mesh, gateway, models_dir, bad_model):
    model = "cand-mirror"
    _release(mesh, 1, models_dir / "chat-v1", ReleaseMode.SWAP, model=model)
    wait_for_primary(gateway, model, 1, timeout=120)
    baseline = _answers(gateway, model)
    _release(mesh, 2, bad_model, ReleaseMode.SHADOW, share=100, model=model)
    _routing_candidate(gateway, model, 2)
    assert _answers(gateway, model) == baseline, "shadow traffic changed what clients got"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ((stats := _candidate_stats(mesh, model)) is None or stats.pairs < 10):
        time.sleep(0.2)
    assert stats is not None and stats.pairs == 10 and stats.missing == 0
    assert stats.rouge_l < 0.5, "a model trained on shuffled words should not agree with the primary"


def test_bad_shadow_candidate_is_rejected_with_reasons(mesh, gateway, models_dir, bad_model):
    model = "cand-reject"
    _with_candidate(mesh, gateway, models_dir, model, bad_model, ReleaseMode.SHADOW, 100)
    record, history = _decision_under_load(mesh, gateway, model, 2, common_pb2.VERSION_STATE_RETIRED)
    assert "policy reject" in record.reason and "ROUGE-L" in record.reason
    assert any("policy reject" in h.reason for h in history)
    assert gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).primary_version == 1


def test_bad_canary_is_rolled_back_with_reasons(mesh, gateway, models_dir, bad_model):
    model = "cand-rollback"
    _with_candidate(mesh, gateway, models_dir, model, bad_model, ReleaseMode.CANARY, 50)
    record, _ = _decision_under_load(mesh, gateway, model, 2, common_pb2.VERSION_STATE_RETIRED)
    assert "policy rollback" in record.reason
    assert gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).primary_version == 1


def test_candidate_equal_to_the_primary_is_promoted(mesh, gateway, models_dir):
    model = "cand-promote"
    _with_candidate(mesh, gateway, models_dir, model, models_dir / "chat-v1", ReleaseMode.SHADOW, 100)
    record, _ = _decision_under_load(mesh, gateway, model, 2, common_pb2.VERSION_STATE_SERVING)
    assert "policy promote" in record.reason
    info = gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)
    assert (info.primary_version, info.previous_version) == (2, 1)
    trail = audit_entries(mesh, "--model", model)
    (decision,) = [e for e in trail if e.action == AuditAction.POLICY_DECISION]
    assert (decision.source, decision.version, decision.details["action"]) == (AuditSource.EVAL_POLICY, 2, "promote")
    assert float(decision.details["rouge_l"]) > 0 and decision.details["samples"].isdigit()
    (applied,) = [e for e in trail if e.action == AuditAction.RELEASE_APPLIED and e.event_id == decision.event_id]
    assert applied.actor == "llmesh-eval policy"  # the promotion the decision published, applied


def test_canary_share_over_1000_requests_and_stickiness(mesh, gateway, models_dir):
    model = "canaryshare"  # its policy holds: nothing is decided while we count
    _release(mesh, 1, models_dir / "chat-v1", ReleaseMode.SWAP, model=model)
    wait_for_primary(gateway, model, 1, timeout=120)
    _release(mesh, 2, models_dir / "chat-v1", ReleaseMode.CANARY, share=30, model=model)
    deadline = time.monotonic() + 60
    while "canary" not in {
        v.version: v.reason for v in gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).versions
    }.get(2, ""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    served: dict[str, list[int]] = {}
    lock = threading.Lock()
    keys = [f"key-{i}" for i in range(1000)] + [f"key-{i}" for i in range(0, 1000, 10)] * 2  # 1000 keys, 100 asked 3 times

    def worker(mine: list[str]) -> None:
        with grpc.insecure_channel(mesh.address("gateway")) as channel:
            from llmesh.v1 import gateway_pb2_grpc

            stub = gateway_pb2_grpc.GatewayStub(channel)
            for key in mine:
                request = gateway_pb2.GenerateRequest(model=model, prompt="The", sampling=common_pb2.SamplingParams(max_tokens=1))
                version = stub.Generate(request, timeout=30, metadata=[("x-api-key", key)]).version
                with lock:
                    served.setdefault(key, []).append(version)

    threads = [threading.Thread(target=worker, args=(keys[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sum(len(v) for v in served.values()) == 1200
    first = Counter(v[0] for v in served.values())
    assert abs(first[2] / 1000 - 0.30) < 0.045, f"{first[2]} of 1000 keys on the canary for a 30% share"
    assert all(len(set(v)) == 1 for v in served.values()), "a key moved between versions"
