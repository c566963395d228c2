"""Release events drive hot swaps, rollbacks and refusals, under live load, with zero failed requests.

Each test releases a model of its own (or a module fixture does), so no test depends on another's
state or on the order the tests run in."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import grpc
import pytest

from llmesh import client
from llmesh.common.events import Provenance, ReleaseEvent, ReleaseMode
from llmesh.loadgen import GatewayLoad, LoadRun, wait_for_primary
from llmesh.v1 import common_pb2, gateway_pb2, infer_pb2, infer_pb2_grpc, tokenize_pb2, tokenize_pb2_grpc
from tests.e2e.gateways import audit_entries
from tests.e2e.kafka_tools import release_dead_letter
from tests.e2e.restarts import kill_and_restart

pytestmark = pytest.mark.slow
MODEL = "swap"  # serving v1, for the refusals
DUPLICATE_ID = "swap-v1-first-release"


def _publish(mesh, event: ReleaseEvent) -> ReleaseEvent:
    asyncio.run(client.publish_release(mesh.address("broker"), event))
    return event


def _answers_with(gateway, version: int, model: str = MODEL) -> None:
    reply = gateway.Generate(
        gateway_pb2.GenerateRequest(model=model, prompt="The", sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=30
    )
    assert reply.version == version


def _serve(mesh, gateway, models_dir: Path, model: str, *versions: int) -> dict[int, ReleaseEvent]:
    """Release `versions` of `model` one after another (odd from chat-v1, even from chat-v2)."""
    events = {}
    for version in versions:
        events[version] = _publish(mesh, client.release_for(model, version, models_dir / f"chat-v{2 - version % 2}"))
        wait_for_primary(gateway, model, version, timeout=120)
    return events


def _check_load(run: LoadRun, flip_at: float, new_version: int) -> None:
    assert run.samples, "the load produced no requests"
    assert run.errors == [], f"{len(run.errors)} failed requests, e.g. {run.errors[0].error}"
    assert all(len(s.versions) == 1 for s in run.samples), "a response mixed versions"
    after = [s for s in run.samples if s.started > flip_at]
    assert after, "no request started after the flip"
    assert {v for s in after for v in s.versions} == {new_version}
    assert any(s.stream for s in after) and any(not s.stream for s in after)


@pytest.fixture(scope="module")
def swap_model(mesh, gateway, models_dir: Path) -> ReleaseEvent:
    event = _publish(mesh, client.release_for(MODEL, 1, models_dir / "chat-v1", event_id=DUPLICATE_ID))
    wait_for_primary(gateway, MODEL, 1, timeout=120)
    return event


def test_hot_swap_under_load(mesh, gateway, models_dir):
    model = "hotswap"
    _serve(mesh, gateway, models_dir, model, 1)
    with GatewayLoad(mesh.address("gateway"), model, clients=4) as load:
        time.sleep(2)
        _publish(mesh, client.release_for(model, 2, models_dir / "chat-v2", label="swap-v2"))
        flip_at = wait_for_primary(gateway, model, 2, timeout=120)
        time.sleep(2)
    _check_load(load.run, flip_at, 2)
    assert {v for s in load.run.samples if s.finished < flip_at for v in s.versions} == {1}
    info = gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)
    versions = {v.version: v for v in info.versions}
    assert versions[2].state == common_pb2.VERSION_STATE_SERVING
    assert versions[1].state == common_pb2.VERSION_STATE_READY, "the previous version stays loaded for rollback"
    v2_states = [h.state for h in info.history if h.version == 2]
    S = common_pb2
    assert v2_states == [S.VERSION_STATE_STAGED, S.VERSION_STATE_LOADING, S.VERSION_STATE_READY, S.VERSION_STATE_SERVING]
    assert info.previous_version == 1


def test_rollback_under_load_is_back_within_a_second(mesh, gateway, admin, models_dir):
    model = "rollback"
    _serve(mesh, gateway, models_dir, model, 1, 2)
    with GatewayLoad(mesh.address("gateway"), model, clients=4) as load:
        time.sleep(1)
        asked = time.monotonic()
        reply = admin.Rollback(gateway_pb2.RollbackRequest(model=model, reason="test"), timeout=10)
        flip_at = wait_for_primary(gateway, model, 1)
        time.sleep(1.5)
    assert reply.version == 1
    assert flip_at - asked < 1.0, f"rollback took {flip_at - asked:.2f}s"
    _check_load(load.run, flip_at, 1)


def _copy(models_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "artifacts"
    shutil.copytree(models_dir / "chat-v2", target)
    return target


def _corrupt(d: Path) -> ReleaseEvent:
    event = client.release_for(MODEL, 10, d)
    with (d / "model.safetensors").open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    return event


def _pickled(d: Path) -> ReleaseEvent:
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    return client.release_for(MODEL, 10, d)


def _unloadable(d: Path) -> ReleaseEvent:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"model_type": "no-such-architecture"}))
    return client.release_for(MODEL, 10, d)


REFUSALS = {
    "not newer": (lambda d: client.release_for(MODEL, 1, d), "is not newer than 1"),
    "duplicate event id": (lambda d: client.release_for(MODEL, 10, d, event_id=DUPLICATE_ID), "duplicate event id"),
    "missing artifact": (
        lambda d: (
            client.release_for(MODEL, 10, d)
            .model_copy(update={"artifact_uri": str(d.parent / "no-such-dir")})  # inside the allowed folders
            .signed(client.release_key())
        ),
        "does not exist",
    ),
    "corrupt artifact": (_corrupt, "sha256 mismatch for model.safetensors"),
    "pickled weights": (_pickled, "pickled weights are refused"),
    "bad signature": (lambda d: client.release_for(MODEL, 10, d, author="mallory").signed(b"not-the-key"), "bad signature"),
    "unsigned": (
        lambda d: client.release_for(MODEL, 10, d, author="mallory").model_copy(update={"signature": ""}),
        "unsigned event",
    ),
    "unknown model": (lambda d: client.release_for("ghost", 1, d, mode=ReleaseMode.ROLLBACK), "unknown model 'ghost'"),
    "load failure in Triton": (_unloadable, "Triton could not load"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_release_is_dead_lettered_and_serving_is_untouched(mesh, gateway, swap_model, models_dir, tmp_path, case):
    make, reason = REFUSALS[case]
    event = _publish(mesh, make(_copy(models_dir, tmp_path)))
    assert reason in release_dead_letter(mesh.address("broker"), event.event_id)
    assert gateway.GetModel(gateway_pb2.GetModelRequest(name=MODEL), timeout=5).primary_version == 1
    _answers_with(gateway, 1)
    (refused,) = [
        e for e in audit_entries(mesh, "--model", event.model) if (e.action, e.event_id) == ("release.refused", event.event_id)
    ]
    assert reason in refused.reason and refused.offset >= 0
    if "sign" in reason:  # a forged event's author is a claim, never the actor
        assert (refused.actor, refused.details["claimed_author"]) == ("", "mallory")


def test_release_as_json_from_a_plain_kafka_client_is_applied(mesh, gateway, models_dir):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    model = "json"
    lineage = Provenance(
        base_model="chat",
        base_model_digest="ab" * 32,
        training_data_digest="cd" * 32,
        training_code_commit="0123456789abcdef",
        training_run_id="run-42",
        evaluation={"rouge_l": 0.61},
        tags={"team": "search"},
    )
    event = client.release_for(model, 3, models_dir / "chat-v2", label="from-json", author="confluent-kafka", provenance=lineage)
    producer = confluent_kafka.Producer({"bootstrap.servers": mesh.address("broker")})
    producer.produce("llmesh.releases", key=model, value=event.model_dump_json(), headers={"content-type": "application/json"})
    assert producer.flush(10) == 0
    wait_for_primary(gateway, model, 3, timeout=120)
    _answers_with(gateway, 3, model)
    info = gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)
    (version,) = [v for v in info.versions if v.version == 3]
    assert (version.label, version.author) == ("from-json", "confluent-kafka")
    assert Provenance.from_proto(version.provenance) == lineage  # the lineage is kept with the version


def _loaded(mesh) -> set[tuple[str, int]]:
    import grpc

    with grpc.insecure_channel(mesh.address("infer")) as channel:
        reply = infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), timeout=10)
    return {(v.model, v.version) for v in reply.versions}


def test_unrouted_version_drains_and_retires(mesh, gateway, models_dir):
    model = "retire"
    _serve(mesh, gateway, models_dir, model, 1, 2, 3)  # 3 serves, 2 backs rollback, 1 is needed no more
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {v.version: v.state for v in gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).versions}
        if states[1] == common_pb2.VERSION_STATE_RETIRED:
            break
        time.sleep(0.2)
    assert states == {
        1: common_pb2.VERSION_STATE_RETIRED,
        2: common_pb2.VERSION_STATE_READY,
        3: common_pb2.VERSION_STATE_SERVING,
    }
    assert (model, 1) not in _loaded(mesh) and {(model, 2), (model, 3)} <= _loaded(mesh)


def test_killed_infer_comes_back_serving_the_same_versions(mesh, gateway, models_dir):
    model = "restarted"
    _serve(mesh, gateway, models_dir, model, 1, 2)
    before = _loaded(mesh)
    assert {(model, 1), (model, 2), ("chat", 1)} <= before
    kill_and_restart(mesh, "infer")
    assert _loaded(mesh) == before
    _answers_with(gateway, 2, model)


def test_killed_tokenize_comes_back_and_tokenizes_every_version(mesh, gateway, models_dir):
    model = "tokenized"
    _serve(mesh, gateway, models_dir, model, 1, 2)
    kill_and_restart(mesh, "tokenize")
    _answers_with(gateway, 2, model)
    with grpc.insecure_channel(mesh.address("tokenize")) as channel:
        stub = tokenize_pb2_grpc.TokenizerStub(channel)
        for version in (1, 2):
            assert stub.Tokenize(tokenize_pb2.TokenizeRequest(model=model, version=version, text="The"), timeout=10).ids
