"""Every service: health SERVING, reflection lists its API, Prometheus /metrics answers."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmesh import client
from llmesh.stack.layout import SERVICES
from llmesh.v1 import eval_pb2, eval_pb2_grpc, gateway_pb2, infer_pb2, infer_pb2_grpc, tokenize_pb2, tokenize_pb2_grpc

pytestmark = pytest.mark.slow
API = {"gateway": "llmesh.v1.Gateway", "tokenize": "llmesh.v1.Tokenizer", "infer": "llmesh.v1.Infer", "eval": "llmesh.v1.Eval"}


@pytest.mark.parametrize("service", SERVICES)
def test_health_reflection_and_metrics(mesh, service):
    address = mesh.address(service)
    assert client.health_status(address) == "SERVING"
    assert client.health_status(address, API[service]) == "SERVING"
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {API[service], "grpc.health.v1.Health"} <= names
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.ports[service + '_metrics']}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert response.status == 200 and "process_resident_memory_bytes" in body


def test_the_container_health_check_command_exits_0_only_when_serving(mesh):
    def health(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llmesh.cli", "health", address], capture_output=True, text=True, timeout=30)

    serving = health(mesh.address("gateway"))
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")
    nobody = health("127.0.0.1:1")
    assert (nobody.returncode, nobody.stdout.strip()) == (1, "UNREACHABLE")


def test_service_apis_answer(mesh, gateway):
    gateway.Generate(gateway_pb2.GenerateRequest(model="chat", prompt="Return"), timeout=30)  # eval has one to report
    with grpc.insecure_channel(mesh.address("tokenize")) as channel:
        reply = tokenize_pb2_grpc.TokenizerStub(channel).Tokenize(
            tokenize_pb2.TokenizeRequest(model="chat", text="Return the value"), timeout=10
        )
        assert reply.ids and "".join(reply.tokens).replace("Ġ", " ") == "Return the value"
    with grpc.insecure_channel(mesh.address("infer")) as channel:
        loaded = infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), timeout=10)
        assert ("chat", 1, "chat-v1") in [(v.model, v.version, v.triton_model) for v in loaded.versions]
    with grpc.insecure_channel(mesh.address("eval")) as channel:
        report = eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(model="chat"), timeout=10)
        assert report.versions and report.versions[0].requests >= 1
