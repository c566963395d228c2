"""The audit trail through the public surfaces: a release from a Kafka client, a rollback through
the Admin API with an admin key, a key made with the CLI; each is listed by `llmesh audit --json`
with who did it and from where; a restart of Redis and of every service (infer replays the release
topic) changes nothing in it, and `llmesh audit verify` finds an entry removed from the store."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from llmesh import client
from llmesh.common.audit import LOG_KEY, AuditEntry
from llmesh.loadgen import wait_for_primary
from llmesh.stack import processes, stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.e2e.gateways import audit_entries, cli, new_key, start_keyed_gateway
from tests.e2e.kafka_tools import audit_records
from tests.e2e.restarts import kill_and_restart

pytestmark = pytest.mark.slow
MODEL = "audited"


def _wait_for(mesh: StackLayout, action: str, event_id: str) -> AuditEntry:
    deadline = time.monotonic() + 60
    while not (found := [e for e in audit_entries(mesh, "--model", MODEL) if e.action == action and e.event_id == event_id]):
        assert time.monotonic() < deadline, f"no {action} entry for {event_id}"
        time.sleep(0.2)
    (entry,) = found
    return entry


def test_releases_rollbacks_and_keys_are_audited_with_who_and_where(mesh, gateway, models_dir, tmp_path):
    for version, folder in ((1, "chat-v1"), (2, "chat-v2")):
        event = client.release_for(MODEL, version, models_dir / folder, author="release-bot", reason=f"ship v{version}")
        asyncio.run(client.publish_release(mesh.address("broker"), event))
        wait_for_primary(gateway, MODEL, version, timeout=120)
    applied = _wait_for(mesh, "release.applied", event.event_id)
    assert (applied.actor, applied.source, applied.version, applied.reason) == ("release-bot", "kafka", 2, "ship v2")
    assert applied.offset >= 0 and applied.details["mode"] == "swap"

    key_id, secret = new_key(mesh, "--scope", "admin")
    (made,) = [e for e in audit_entries(mesh) if e.action == "key.created" and e.details["key_id"] == key_id]
    assert made.source == "cli" and made.actor

    keyed = start_keyed_gateway(mesh, "gateway-audit", tmp_path)
    try:
        admin = gateway_pb2_grpc.AdminStub(client.gateway_channel(keyed.address, api_key=secret, tls_ca=keyed.cert))
        reply = admin.Rollback(gateway_pb2.RollbackRequest(model=MODEL, reason="v2 answers worse"), timeout=10)
        wait_for_primary(gateway, MODEL, 1, timeout=60)
        requested = _wait_for(mesh, "rollback.requested", reply.event_id)
        assert (requested.actor, requested.actor_key_id, requested.source) == ("e2e", key_id, "admin-api")
        rolled_back = _wait_for(mesh, "release.applied", reply.event_id)
        assert (rolled_back.details["mode"], rolled_back.version, rolled_back.reason) == ("rollback", 1, "v2 answers worse")
        audit = admin.GetAudit(gateway_pb2.GetAuditRequest(model=MODEL), timeout=10)  # the same trail, through the API
        assert list(audit.problems) == []
        assert [r.id for r in audit.entries] == [e.id for e in audit_entries(mesh, "--model", MODEL)]
    finally:
        processes.stop(mesh, keyed.name)

    trail = audit_entries(mesh)
    exported = audit_records(mesh.address("broker"), {e.id for e in trail})  # eval publishes the trail in chain order
    in_order = list(dict.fromkeys(r.id for r in exported))  # at least once: an id may come again, later
    assert in_order[: len(trail)] == [e.id for e in trail]
    digests = {r.id: r.digest for r in exported}
    assert all(digests[e.id] == e.digest for e in trail)

    before = audit_entries(mesh, "--model", MODEL)
    assert processes.stop(mesh, "redis")  # every process of the stack restarts: the trail is kept, nothing added
    stack.start_redis(mesh)
    for name in ("gateway", "tokenize", "eval", "infer"):  # infer reads the release topic again from offset 0
        kill_and_restart(mesh, name)
    wait_for_primary(gateway, MODEL, 1, timeout=120)
    assert [e.id for e in audit_entries(mesh, "--model", MODEL)] == [e.id for e in before], "a restart changed the trail"
    assert cli(mesh, "audit", "verify").returncode == 0

    store = redis.Redis.from_url(mesh.redis_url, decode_responses=True)
    try:
        removed = store.lindex(LOG_KEY, 1)
        successor = store.lindex(LOG_KEY, 2)
        store.lrem(LOG_KEY, 1, removed)
        broken = cli(mesh, "audit", "verify", check=False)
        assert broken.returncode == 1 and "removed" in broken.stdout
        store.linsert(LOG_KEY, "BEFORE", successor, removed)  # put back: the shared stack's trail stays whole
        assert json.loads(cli(mesh, "audit", "verify").stdout.strip().splitlines()[-1])["intact"] is True
    finally:
        store.close()
