"""The release plane with two infer replicas, each with its own tritonserver: every replica loads
every routed version before traffic moves, a new replica loads the desired set before it takes
requests, replays change nothing, and serving never depends on the operator's folder.

Each test releases a model of its own, so the tests do not depend on each other's order."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmesh import client
from llmesh.common import topics
from llmesh.common.events import ReleaseEvent, ReleaseMode
from llmesh.common.registry import Registry
from llmesh.loadgen import GatewayLoad, wait_for_primary
from llmesh.stack import processes, stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, infer_pb2, infer_pb2_grpc, tokenize_pb2, tokenize_pb2_grpc
from tests.e2e.conftest import RELEASE_KEY
from tests.e2e.restarts import kill_and_restart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(mesh: StackLayout) -> Iterator[StackLayout]:
    """The session's stack with a second infer replica."""
    stack.scale_infer(mesh, 2, print)
    yield mesh
    stack.scale_infer(mesh, 1, print)


def _publish(mesh: StackLayout, event: ReleaseEvent) -> ReleaseEvent:
    asyncio.run(client.publish_release(mesh.address("broker"), event))
    return event


def _metrics_ports(mesh: StackLayout) -> dict[str, int]:
    return {"infer": mesh.ports["infer_metrics"]} | {n: p["metrics"] for n, p in stack.extra_replicas(mesh).items()}


def _served(port: int, model: str) -> dict[int, float]:
    """OK answers per version of `model` on one replica, from its Prometheus metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    served: dict[int, float] = {}
    for labels, value in re.findall(r"^llmesh_infer_requests_total\{(.*)\} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") == model and found.get("code") == "OK":
            served[int(found["version"])] = float(value)
    return served


def _loaded(address: str) -> set[tuple[str, int]]:
    with grpc.insecure_channel(address) as channel:
        reply = infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), timeout=10)
    return {(v.model, v.version) for v in reply.versions}


def _model(gateway, name: str) -> gateway_pb2.ModelInfo:
    return gateway.GetModel(gateway_pb2.GetModelRequest(name=name), timeout=5)


def _wait_for_candidate(mesh: StackLayout, name: str, version: int, timeout: float = 120) -> None:
    async def routed() -> int:
        registry = Registry.from_url(mesh.redis_url)
        try:
            return (await registry.routing(name)).candidate
        finally:
            await registry.close()

    deadline = time.monotonic() + timeout
    while asyncio.run(routed()) != version:
        assert time.monotonic() < deadline, f"{name} v{version} did not become the candidate"
        time.sleep(0.1)


def _generate(gateway, model: str, prompt: str = "The") -> gateway_pb2.GenerateResponse:
    request = gateway_pb2.GenerateRequest(model=model, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=3))
    return gateway.Generate(request, timeout=30)


def test_two_replicas_swap_canary_and_rollback_under_load(fleet, gateway, admin, models_dir: Path):
    model = "fleet"
    _publish(fleet, client.release_for(model, 1, models_dir / "chat-v1"))
    wait_for_primary(gateway, model, 1, timeout=120)
    with GatewayLoad(fleet.address("gateway"), model, clients=4) as load:
        time.sleep(2)
        _publish(fleet, client.release_for(model, 2, models_dir / "chat-v2"))
        wait_for_primary(gateway, model, 2, timeout=120)
        time.sleep(2)
        _publish(fleet, client.release_for(model, 3, models_dir / "chat-v1", mode=ReleaseMode.CANARY, share_percent=30))
        _wait_for_candidate(fleet, model, 3)
        for n in range(16):  # pinned requests reach the candidate on every partition, whatever the canary's hash
            assert _generate(gateway, f"{model}@3", f"The {n}").version == 3
        time.sleep(2)
        admin.Rollback(gateway_pb2.RollbackRequest(model=model, reason="test"), timeout=10)
        wait_for_primary(gateway, model, 1, timeout=60)
        time.sleep(2)
    run = load.run
    assert run.samples and run.errors == [], f"{len(run.errors)} failed, e.g. {run.errors[0].error if run.errors else ''}"
    assert all(len(s.versions) == 1 for s in run.samples), "an answer mixed versions"
    assert {v for s in run.samples for v in s.versions} >= {1, 2}
    for replica, port in _metrics_ports(fleet).items():
        served = _served(port, model)
        assert {1, 2, 3} <= set(served), f"{replica} served only versions {sorted(served)}"

    # kill -9 one replica and start a new one: it loads the desired set before it takes requests
    history = len(_model(gateway, model).history)
    os.kill(processes.pid_of(fleet, "infer-2") or 0, signal.SIGKILL)
    stack.scale_infer(fleet, 1, print)
    address = stack.start_infer_replica(fleet, "infer-2")
    assert {(model, 1), (model, 3)} <= _loaded(address), "a new replica took requests before loading the desired set"
    with GatewayLoad(fleet.address("gateway"), model, clients=2) as load:
        time.sleep(3)
    assert load.run.samples and load.run.errors == []
    assert len(_model(gateway, model).history) == history, "a new replica applied an event again"
    assert _model(gateway, model).primary_version == 1


def _plain_json(event: ReleaseEvent) -> bytes:
    """A release as an operator writes it by hand: no event_id, no created_at, signed over the rest."""
    fields = event.model_dump(mode="json", exclude={"event_id", "created_at", "signature"})
    fields["signature"] = hmac.new(RELEASE_KEY.encode(), json.dumps(fields, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    return json.dumps(fields).encode()


def _publish_json(mesh: StackLayout, payload: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=mesh.address("broker"))
        await producer.start()
        try:
            await producer.send_and_wait(topics.RELEASES, payload, key=b"replay", headers=[("content-type", b"application/json")])
        finally:
            await producer.stop()

    asyncio.run(send())


def _snapshot(gateway, model: str) -> tuple[object, ...]:
    info = _model(gateway, model)
    return (
        info.primary_version,
        info.previous_version,
        [(v.version, v.state) for v in info.versions],
        [(h.version, h.state, h.reason) for h in info.history],
    )


def test_json_releases_without_event_id_are_not_applied_again_on_replay(fleet, gateway, models_dir: Path):
    model = "replay"
    for version, artifacts, mode in (
        (1, "chat-v1", ReleaseMode.SWAP),
        (2, "chat-v2", ReleaseMode.SWAP),
        (1, "chat-v1", ReleaseMode.ROLLBACK),
    ):
        _publish_json(fleet, _plain_json(client.release_for(model, version, models_dir / artifacts, mode=mode)))
        wait_for_primary(gateway, model, version, timeout=120)
    before = _snapshot(gateway, model)
    assert before[0] == 1 and before[1] == 2
    for _ in range(2):
        kill_and_restart(fleet, "infer")  # reads the release topic again from offset 0
        assert _snapshot(gateway, model) == before
    stack.scale_infer(fleet, 3, print)
    try:
        assert _snapshot(gateway, model) == before
        assert _generate(gateway, model).version == 1
    finally:
        stack.scale_infer(fleet, 2, print)


def test_a_version_keeps_serving_after_its_folder_is_deleted_and_every_service_restarts(fleet, gateway, models_dir, tmp_path):
    model, folder = "orphan", tmp_path / "artifacts"
    shutil.copytree(models_dir / "chat-v2", folder)
    _publish(fleet, client.release_for(model, 1, folder))
    wait_for_primary(gateway, model, 1, timeout=120)
    shutil.rmtree(folder)
    for service in ("gateway", "tokenize", "eval", "infer"):
        kill_and_restart(fleet, service)
    assert _generate(gateway, model).version == 1
    states = {v.version: v.state for v in _model(gateway, model).versions}
    assert states == {1: common_pb2.VERSION_STATE_SERVING}


def test_a_failed_version_released_again_is_served_with_its_new_tokenizer(fleet, gateway, models_dir, tmp_path):
    model, bad = "refix", tmp_path / "bad"
    _publish(fleet, client.release_for(model, 1, models_dir / "chat-v1"))
    wait_for_primary(gateway, model, 1, timeout=120)
    shutil.copytree(models_dir / "chat-v2", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"n_positions": 8, "model_type": "no-such-architecture"}))
    failed = _publish(fleet, client.release_for(model, 2, bad))
    deadline = time.monotonic() + 120
    while {v.version: v.state for v in _model(gateway, model).versions}.get(2) != common_pb2.VERSION_STATE_FAILED:
        assert time.monotonic() < deadline, "the broken version did not fail"
        time.sleep(0.2)
    good = _publish(fleet, client.release_for(model, 2, models_dir / "chat-v2"))
    assert good.event_id != failed.event_id
    wait_for_primary(gateway, model, 2, timeout=120)
    long_prompt = "Return the number of items in the list of values that this module provides " * 2
    assert _generate(gateway, model, long_prompt).version == 2  # the failed tokenizer took at most 7 tokens
    with grpc.insecure_channel(fleet.address("tokenize")) as channel:
        stub = tokenize_pb2_grpc.TokenizerStub(channel)
        reply = stub.Tokenize(tokenize_pb2.TokenizeRequest(model=model, version=2, text=long_prompt), timeout=10)
    assert len(reply.ids) > 8
