"""Feedback through the public APIs: answers of two versions rated by the key that asked (gRPC and
HTTP), another key refused, the ratings in `llmesh eval report`; `llmesh eval export` writes the rated
answers with their prompts when the gateway records texts, and refuses, saying why, when it does not."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest

from llmesh import client
from llmesh.loadgen import wait_for_primary
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.gateways import new_key, start_keyed_gateway

pytestmark = pytest.mark.slow
MODEL = "rated"


def _cli(mesh: StackLayout, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmesh.cli", "eval", *args, "--home", str(mesh.home)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def _ask(stub: gateway_pb2_grpc.GatewayStub, model: str, prompt: str) -> gateway_pb2.GenerateResponse:
    sampling = common_pb2.SamplingParams(max_tokens=12, seed=5)
    return stub.Generate(gateway_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling), timeout=60)


def _rate(stub: gateway_pb2_grpc.GatewayStub, request_id: str, rating: int, label: str = "") -> gateway_pb2.FeedbackResponse:
    return stub.SubmitFeedback(gateway_pb2.FeedbackRequest(request_id=request_id, rating=rating, label=label), timeout=10)


def _feedback_rows(mesh: StackLayout, want: int) -> list[dict]:
    deadline = time.monotonic() + 60
    while True:
        done = _cli(mesh, "report", "--json", "--model", MODEL)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = json.loads(done.stdout)["feedback"]
        if sum(int(r["ratings"]) for r in rows) >= want:
            return rows
        assert time.monotonic() < deadline, f"eval counted {rows}, not {want} ratings"
        time.sleep(0.5)


def test_feedback_on_two_versions_is_reported_and_exported(mesh: StackLayout, gateway, models_dir, tmp_path: Path):
    for version in (1, 2):  # v2 serves, v1 stays loaded as the previous version
        asyncio.run(
            client.publish_release(mesh.address("broker"), client.release_for(MODEL, version, models_dir / f"chat-v{version}"))
        )
        wait_for_primary(gateway, MODEL, version, timeout=120)
    _, alice = new_key(mesh, "--scope", "generate")
    _, bob = new_key(mesh, "--scope", "generate")
    keyed = start_keyed_gateway(mesh, "gateway-feedback", tmp_path, LLMESH_RECORD_TEXTS="true")
    as_alice = gateway_pb2_grpc.GatewayStub(client.gateway_channel(keyed.address, api_key=alice, tls_ca=keyed.cert))
    as_bob = gateway_pb2_grpc.GatewayStub(client.gateway_channel(keyed.address, api_key=bob, tls_ca=keyed.cert))
    try:
        old, new = _ask(as_alice, f"{MODEL}@1", "Return the number of"), _ask(as_alice, f"{MODEL}@2", "Create a new")
        assert _rate(as_alice, old.request_id, 2, "wrong").version == 1
        reply = httpx.post(
            keyed.http_url + "/feedback",
            json={"request_id": f"cmpl-{new.request_id}", "rating": 5, "label": "good", "comment": "exactly right"},
            headers={"authorization": f"Bearer {alice}"},
            verify=ssl.create_default_context(cafile=keyed.cert),
            timeout=10,
        )
        assert reply.status_code == 200 and reply.json()["model"] == f"{MODEL}@2", reply.text
        with pytest.raises(grpc.RpcError) as other:
            _rate(as_bob, new.request_id, 1)
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert other.value.details() == "only the key that made a request may rate its answer"
        with pytest.raises(grpc.RpcError) as unknown:
            _rate(as_alice, "0123456789abcdef", 3)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            _rate(as_alice, new.request_id, 9)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rating" in str(bad.value.details())
    finally:
        processes.stop(mesh, keyed.name)

    rows = {int(r["version"]): r for r in _feedback_rows(mesh, 2)}
    assert (float(rows[1]["rating_mean"]), rows[1]["labels"]) == (2.0, {"wrong": "1"})
    assert (float(rows[2]["rating_mean"]), rows[2]["labels"]) == (5.0, {"good": "1"})
    assert "feedback by version and scenario" in _cli(mesh, "report", "--model", MODEL).stdout

    exported = tmp_path / "set.jsonl"
    done = _cli(mesh, "export", "--out", str(exported), "--min-rating", "4", "--model", MODEL, "--since", "1h")
    assert done.returncode == 0, done.stdout + done.stderr
    (example,) = [json.loads(line) for line in exported.read_text().splitlines()]
    assert (example["request_id"], example["version"], example["rating"]) == (new.request_id, 2, 5)
    assert (example["prompt"], example["answer"], example["comment"]) == ("Create a new", new.text, "exactly right")

    unrecorded = _ask(gateway, "chat", "This module provides")  # the stack's gateway keeps no texts (the default)
    _rate(gateway, unrecorded.request_id, 4)
    deadline = time.monotonic() + 60
    while (refused := _cli(mesh, "export", "--out", str(tmp_path / "none.jsonl"), "--model", "chat")).returncode == 0:
        assert time.monotonic() < deadline, "eval never counted the rating of an unrecorded answer"
        time.sleep(0.5)
    assert refused.returncode == 1 and "LLMESH_RECORD_TEXTS=true" in refused.stdout, refused.stdout
