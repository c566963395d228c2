"""Approval gates through the public surfaces, under load: a swap that the policy gates is staged and
loaded but serves nobody; its author cannot approve it (through the Admin API, nor with a signed
Kafka event); another key's approval routes it within a second with no failed request; a release
nobody approves in time is rejected by eval, unloaded and recorded."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from llmesh import client
from llmesh.common.events import ReleaseEvent, ReleaseMode
from llmesh.loadgen import GatewayLoad, wait_for_primary
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.conftest import SIGNERS
from tests.e2e.gateways import audit_entries, new_key, start_keyed_gateway
from tests.e2e.kafka_tools import release_dead_letter

pytestmark = pytest.mark.slow
MODEL = "gated"  # the stack's policy: a swap needs 1 approval, not the author's (tests/e2e/conftest.py)
EXPIRING = "gatedexpiry"  # ... and waits 20 s at most


def _info(gateway: gateway_pb2_grpc.GatewayStub, model: str) -> gateway_pb2.ModelInfo:
    return gateway.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)


def _state(info: gateway_pb2.ModelInfo, version: int) -> str:
    states = [common_pb2.VersionState.Name(v.state) for v in info.versions if v.version == version]
    return states[0].removeprefix("VERSION_STATE_") if states else ""


def _wait_for_state(gateway: gateway_pb2_grpc.GatewayStub, model: str, version: int, state: str) -> gateway_pb2.ModelInfo:
    """GetModel once `version` is in `state` (PENDING_APPROVAL: and the desired state says so too)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            info = _info(gateway, model)
            pending = info.pending.version == version or state != "PENDING_APPROVAL"
            if _state(info, version) == state and pending:
                return info
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, f"{model} v{version} never reached {state}"
        time.sleep(0.1)


def _served_only(run_samples, version: int) -> None:
    assert run_samples, "the load produced no requests"
    failed = [s for s in run_samples if s.error]
    assert failed == [], f"{len(failed)} failed requests, e.g. {failed[0].error}"
    assert {v for s in run_samples for v in s.versions} == {version}


def test_a_gated_swap_waits_for_another_keys_approval_under_load(mesh: StackLayout, gateway, admin, models_dir, tmp_path):
    first = client.release_for(MODEL, 1, models_dir / "chat-v1").signed(SIGNERS["release-pipeline"].encode(), "release-pipeline")
    asyncio.run(client.publish_release(mesh.address("broker"), first))  # by a named signer: its own key
    _wait_for_state(gateway, MODEL, 1, "PENDING_APPROVAL")  # even the first release waits
    admin.Approve(gateway_pb2.ApprovalRequest(model=MODEL, version=1, author="oncall"), timeout=10)  # keys off: named
    wait_for_primary(gateway, MODEL, 1, timeout=60)

    alice_id, alice = new_key(mesh, "--name", "alice", "--scope", "admin", "--scope", "approve")
    bob_id, bob = new_key(mesh, "--name", "bob", "--scope", "approve")
    _, releaser = new_key(mesh, "--name", "carol", "--scope", "admin")
    keyed = start_keyed_gateway(mesh, "gateway-approvals", tmp_path)

    def admin_as(secret: str) -> gateway_pb2_grpc.AdminStub:
        return gateway_pb2_grpc.AdminStub(client.gateway_channel(keyed.address, api_key=secret, tls_ca=keyed.cert))

    try:
        with GatewayLoad(mesh.address("gateway"), MODEL, clients=4) as load:
            v2 = client.release_for(MODEL, 2, models_dir / "chat-v2", author="whoever", reason="better answers")
            admin_as(alice).PublishRelease(v2.to_proto(), timeout=10)  # the author becomes the caller: alice
            info = _wait_for_state(gateway, MODEL, 2, "PENDING_APPROVAL")
            assert (info.pending.version, info.pending.author, info.pending.needed) == (2, "alice", 1)
            time.sleep(2)  # loaded everywhere and waiting: nobody is served by it meanwhile

            approve = gateway_pb2.ApprovalRequest(model=MODEL, version=2, reason="reviewed")
            with pytest.raises(grpc.RpcError) as own:
                admin_as(alice).Approve(approve, timeout=10)
            assert own.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'alice' released version 2 and may not approve it" in str(own.value.details())
            with pytest.raises(grpc.RpcError) as scope:
                admin_as(releaser).Approve(approve, timeout=10)
            assert scope.value.code() == grpc.StatusCode.PERMISSION_DENIED, "an admin key without the approve scope"
            forged = ReleaseEvent(model=MODEL, version=2, mode=ReleaseMode.APPROVE, author="alice").signed(
                client.release_key()
            )  # the release key signs it, yet the author may not approve
            asyncio.run(client.publish_release(mesh.address("broker"), forged))
            assert "may not approve it" in release_dead_letter(mesh.address("broker"), forged.event_id)
            before = time.monotonic()
            assert _info(gateway, MODEL).primary_version == 1

            asked = time.monotonic()
            reply = admin_as(bob).Approve(approve, timeout=10)
            flip_at = wait_for_primary(gateway, MODEL, 2, timeout=30)
            time.sleep(1.5)
        print(f"approval routed v2 in {flip_at - asked:.3f} s under {len(load.run.samples)} requests")
        assert flip_at - asked < 1.0, f"the approval took {flip_at - asked:.2f}s to route"
        _served_only([s for s in load.run.samples if s.finished < before], 1)
        _served_only([s for s in load.run.samples if s.started > flip_at], 2)
        assert [s for s in load.run.samples if s.error] == []
    finally:
        processes.stop(mesh, keyed.name)

    (pending_v1,) = [e for e in audit_entries(mesh, "--model", MODEL) if e.action == "release.pending" and e.version == 1]
    assert (pending_v1.actor, pending_v1.actor_key_id) == ("release-pipeline", "release-pipeline"), "the signer's key id"
    trail = [e for e in audit_entries(mesh, "--model", MODEL) if e.version == 2]
    by_action = {(e.action, e.actor) for e in trail}
    assert {("release.requested", "alice"), ("release.pending", "alice"), ("approval.requested", "bob")} <= by_action
    (applied,) = [e for e in trail if e.action == "release.applied" and e.event_id == reply.event_id]
    assert (applied.actor, applied.details["mode"], applied.reason) == ("bob", "approve", "reviewed")
    (requested,) = [e for e in trail if e.action == "approval.requested"]
    assert requested.actor_key_id == bob_id and alice_id != bob_id
    refused = [e for e in trail if e.action == "release.refused" and e.event_id == forged.event_id]
    assert refused and "may not approve it" in refused[0].reason


def test_a_release_nobody_approves_expires_and_is_unloaded(mesh: StackLayout, gateway, models_dir):
    event = client.release_for(EXPIRING, 1, models_dir / "chat-v1", author="release-bot")
    asyncio.run(client.publish_release(mesh.address("broker"), event))
    waiting = _wait_for_state(gateway, EXPIRING, 1, "PENDING_APPROVAL")
    assert waiting.pending.version == 1 and waiting.pending.expires_at - waiting.pending.requested_at == 20
    request = gateway_pb2.GenerateRequest(model=f"{EXPIRING}@1", prompt="The", sampling=common_pb2.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.RpcError) as pinned:
        gateway.Generate(request, timeout=30)
    assert pinned.value.code() == grpc.StatusCode.NOT_FOUND, "a version that waits for approval serves nobody, pinned or not"

    info = _wait_for_state(gateway, EXPIRING, 1, "RETIRED")  # eval rejected it; every infer replica unloaded it
    assert not info.HasField("pending") and info.primary_version == 0
    states = [(common_pb2.VersionState.Name(h.state), h.reason) for h in info.history if h.version == 1]
    assert states[-1][0] == "VERSION_STATE_RETIRED" and states[-1][1].startswith("approval expired: 0 of 1 approvals")
    (expired,) = [e for e in audit_entries(mesh, "--model", EXPIRING) if e.action == "approval.expired"]
    assert (expired.source, expired.details["release_event_id"]) == ("eval-policy", event.event_id)
