from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmesh.stack import stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import gateway_pb2_grpc

RELEASE_KEY = "e2e-release-key"
SIGNERS = {"release-pipeline": "e2e-pipeline-key"}  # a named signer: its events are authored by it
POLICY = """
min_samples: 12
window_s: 600
thresholds: {rouge_l_min: 0.5, embedding_cosine_min: 0.6}
models:
  canaryshare: {on_pass: hold, on_fail: hold}   # measured, never decided
  fleet: {on_pass: hold, on_fail: hold}
  shadowcost: {on_pass: hold, on_fail: hold}    # the shadow-cost benchmark's model
  httpcanary: {on_pass: hold, on_fail: hold}    # the HTTP API's candidates (test_openai_api.py)
  httpshadow: {on_pass: hold, on_fail: hold}
  gated: {approval: {modes: [swap], approvals: 1}}          # test_approvals.py
  gatedexpiry: {approval: {modes: [swap], expires_s: 20}}
  hookgated: {approval: {modes: [swap]}}                    # test_webhooks.py: a pending approval notifies
"""


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[StackLayout]:
    """The whole embedded stack (real broker, Redis, tritonserver, four services) on free ports,
    with signed releases required (the services and this process read the same key)."""
    os.environ["LLMESH_RELEASE_HMAC_KEY"] = RELEASE_KEY
    os.environ["LLMESH_RELEASE_SIGNERS"] = json.dumps(SIGNERS)
    home = tmp_path_factory.mktemp("mesh")
    policy = home / "policy.yaml"
    policy.write_text(POLICY)
    os.environ["LLMESH_POLICY_FILE"] = str(policy)
    # releases may name the demo models and the tests' own temporary folders, nothing else
    layout = stack.up(home, print, free_ports=True, models_dir=models_dir, artifact_roots=[tmp_path_factory.getbasetemp()])
    yield layout
    stack.down(home, print)
    del os.environ["LLMESH_RELEASE_HMAC_KEY"], os.environ["LLMESH_POLICY_FILE"], os.environ["LLMESH_RELEASE_SIGNERS"]


@pytest.fixture(scope="session")
def admin(mesh: StackLayout) -> Iterator[gateway_pb2_grpc.AdminStub]:
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield gateway_pb2_grpc.AdminStub(channel)


@pytest.fixture(scope="session")
def gateway(mesh: StackLayout) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)
