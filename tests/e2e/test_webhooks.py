"""Webhook notifications from a running eval replica: a receiver in this test gets the rollback of
a model, signed, and after answering the first delivery with a failure, the retry; and a release
that waits for approval."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from llmesh import client
from llmesh.loadgen import wait_for_primary
from llmesh.stack import processes, stack
from llmesh.stack.layout import free_port
from llmesh.v1 import gateway_pb2
from tests.receiver import serve, verified

pytestmark = pytest.mark.slow
MODEL = "hooked"
GATED = "hookgated"  # its policy: a swap waits for an approval (tests/e2e/conftest.py)
SECRET = "e2e-webhook-secret"


def _delivered(receiver, model: str, action: str) -> dict:
    """The first delivery (answered 200) of an `action` entry of `model`, verified and parsed."""
    deadline = time.monotonic() + 60
    while True:
        for status, headers, body in list(receiver.got):
            payload = json.loads(body)
            if status == 200 and (payload["type"], payload["entry"]["model"]) == (action, model):
                assert verified(SECRET.encode(), headers, body)
                return payload
        assert time.monotonic() < deadline, f"no {action} webhook for {model}; got {len(receiver.got)} deliveries"
        time.sleep(0.2)


def test_a_rollback_reaches_the_webhook_signed_after_a_retry(mesh, gateway, admin, models_dir):
    receiver = serve([500])  # the first delivery fails: it must come again
    port = free_port()
    env = stack.service_env(mesh, "eval") | {
        "LLMESH_GRPC_PORT": str(port),
        "LLMESH_METRICS_PORT": str(free_port()),
        "LLMESH_WEBHOOK_URLS": json.dumps([receiver.url]),
        "LLMESH_WEBHOOK_SECRET": SECRET,
    }
    pid = processes.start(mesh, "eval-webhooks", [sys.executable, "-m", "services.eval"], env)
    try:
        processes.wait_for_port(port, 60, "eval-webhooks", pid)
        for version, folder in ((1, "chat-v1"), (2, "chat-v2")):
            event = client.release_for(MODEL, version, models_dir / folder, author="release-bot")
            asyncio.run(client.publish_release(mesh.address("broker"), event))
            wait_for_primary(gateway, MODEL, version, timeout=120)
        reply = admin.Rollback(gateway_pb2.RollbackRequest(model=MODEL, reason="v2 is worse", author="oncall"), timeout=10)

        deadline = time.monotonic() + 60
        while not (ours := [g for g in receiver.got if g[0] == 200 and json.loads(g[2])["entry"]["event_id"] == reply.event_id]):
            assert time.monotonic() < deadline, f"no webhook for the rollback; got {len(receiver.got)} deliveries"
            time.sleep(0.2)

        gated = client.release_for(GATED, 1, models_dir / "chat-v1", author="release-bot", reason="first version")
        asyncio.run(client.publish_release(mesh.address("broker"), gated))
        pending = _delivered(receiver, GATED, "release.pending")
        assert (pending["entry"]["event_id"], pending["entry"]["actor"]) == (gated.event_id, "release-bot")
        admin.Reject(gateway_pb2.ApprovalRequest(model=GATED, version=1, author="oncall", reason="test over"), timeout=10)
    finally:
        processes.stop(mesh, "eval-webhooks")
        receiver.close()

    _, headers, body = ours[0]
    assert verified(SECRET.encode(), headers, body)
    payload = json.loads(body)
    assert payload["type"] in ("rollback.requested", "release.applied")
    assert (payload["entry"]["model"], payload["entry"]["version"], payload["entry"]["reason"]) == (MODEL, 1, "v2 is worse")
    first_status, first_headers, _ = receiver.got[0]
    assert first_status == 500 and receiver.got[1][1]["llmesh-delivery"] == first_headers["llmesh-delivery"]
