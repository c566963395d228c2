"""The mesh from its images (two infer replicas sharing a model store), through the public gateway:
generate, a hot swap under load, a shadow candidate evaluated and promoted. Runs in file order (each test starts from the previous one's state)."""

from __future__ import annotations

import threading
import time

import grpc
import openai
import pytest

from llmesh.common.events import ReleaseMode
from llmesh.loadgen import GatewayLoad, wait_for_primary
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, infer_pb2, infer_pb2_grpc
from tests.container.conftest import GRPC_PORTS, HTTP_PORT, ContainerMesh

pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(1200)]  # the first builds every image
MODEL = "chat"


def _request(prompt: str, seed: int) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=16, seed=seed))


def test_generate_unary_and_streaming(container_mesh: ContainerMesh, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    container_mesh.release(MODEL, 1, "chat-v1", label="v1")
    _wait_for_state(gateway, 1, common_pb2.VERSION_STATE_SERVING)
    reply = gateway.Generate(_request("Return the number of", 7), timeout=30)
    assert reply.version == 1 and reply.text and reply.usage.completion_tokens > 0
    chunks = list(gateway.GenerateStream(_request("Return the number of", 7), timeout=30))
    assert "".join(chunk.text for chunk in chunks) == reply.text, "same seed, same model: same answer streamed"
    assert {chunk.version for chunk in chunks} == {1}
    http_url = f"http://127.0.0.1:{container_mesh.containers['gateway'].get_exposed_port(HTTP_PORT)}/v1"
    with openai.OpenAI(base_url=http_url, api_key="none", max_retries=0) as sdk:  # the image's HTTP API, same answer
        completion = sdk.completions.create(model=MODEL, prompt="Return the number of", max_tokens=16, seed=7)
        assert completion.choices[0].text == reply.text and completion.system_fingerprint == f"{MODEL}@1"
        assert f"{MODEL}@1" in {model.id for model in sdk.models.list()}


def test_hot_swap_under_load_fails_no_request(container_mesh: ContainerMesh, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    with GatewayLoad(container_mesh.gateway, MODEL, clients=4, max_tokens=16) as load:
        time.sleep(2)
        published = time.monotonic()
        container_mesh.release(MODEL, 2, "chat-v2", label="v2")
        swapped = wait_for_primary(gateway, MODEL, 2, timeout=120)
        time.sleep(3)
    samples = load.run.samples
    print(f"swap: {len(samples)} requests, v2 routed {swapped - published:.1f}s after the release event")
    assert samples and load.run.errors == [], f"failed requests: {load.run.errors[:3]}"
    assert all(len(s.versions) == 1 for s in samples), "an answer mixed versions"
    assert {1} in {s.versions for s in samples if s.finished < published}
    assert {s.versions for s in samples if s.started > swapped} == {frozenset({2})}
    for replica in ("infer", "infer-2"):  # the routing moved only once both replicas had v2 loaded
        address = f"127.0.0.1:{container_mesh.containers[replica].get_exposed_port(GRPC_PORTS[replica])}"
        with grpc.insecure_channel(address) as channel:
            loaded = infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), timeout=10)
        assert {(MODEL, 1), (MODEL, 2)} <= {(v.model, v.version) for v in loaded.versions}, replica


def test_shadow_candidate_is_scored_and_promoted(container_mesh: ContainerMesh, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    # v3 has v2's weights: it agrees with the primary on every mirrored request, so the default policy promotes it
    container_mesh.release(MODEL, 3, "chat-v2", mode=ReleaseMode.SHADOW, share_percent=100, label="v3")
    with GatewayLoad(container_mesh.gateway, MODEL, clients=4, max_tokens=16) as load:
        record = _wait_for_state(gateway, 3, common_pb2.VERSION_STATE_SERVING, timeout=180)
        promoted = time.monotonic()
        time.sleep(2)
    assert "policy promote" in record.reason
    info = gateway.GetModel(gateway_pb2.GetModelRequest(name=MODEL), timeout=5)
    assert (info.primary_version, info.previous_version) == (3, 2)
    assert load.run.samples and load.run.errors == [], f"failed requests: {load.run.errors[:3]}"
    assert {s.versions for s in load.run.samples if s.finished < promoted - 1} == {frozenset({2})}, "shadow answered a client"


def _wait_for_state(
    gateway: gateway_pb2_grpc.GatewayStub, version: int, state: int, timeout: float = 120
) -> gateway_pb2.ModelVersionInfo:
    """Poll GetModel until `version` reaches `state`; a refused release fails at once with its reason."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = gateway.GetModel(gateway_pb2.GetModelRequest(name=MODEL), timeout=5)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            info = gateway_pb2.ModelInfo()
        record = {v.version: v for v in info.versions}.get(version)
        if record and record.state == state:
            return record
        assert not record or record.state != common_pb2.VERSION_STATE_FAILED, f"v{version} refused: {record.reason}"
        assert time.monotonic() < deadline, f"v{version} not {common_pb2.VersionState.Name(state)} after {timeout}s: {record}"
        time.sleep(0.1)


def test_docker_stop_finishes_the_stream_in_flight_and_every_service_exits_0(
    container_mesh: ContainerMesh, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    request = gateway_pb2.GenerateRequest(
        model=MODEL, prompt="This module provides", sampling=common_pb2.SamplingParams(max_tokens=64, seed=3)
    )
    stream = gateway.GenerateStream(request, timeout=60)
    chunks = [next(stream)]
    stopping = threading.Thread(target=container_mesh.containers["gateway"].get_wrapped_container().stop, kwargs={"timeout": 40})
    stopping.start()  # SIGTERM to the gateway (PID 1 of its container) while the answer streams
    chunks += list(stream)
    stopping.join()
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED and {c.version for c in chunks} == {3}
    exits = {}
    for name in ("gateway", "tokenize", "eval", "infer", "infer-2"):
        container = container_mesh.containers[name].get_wrapped_container()
        container.stop(timeout=40)
        exits[name] = container.wait(timeout=5)["StatusCode"]
    assert exits == dict.fromkeys(exits, 0), exits
