"""Webhook notifications (services/eval/webhooks.py) against a real redis-server and a real HTTP
receiver in this test: signed deliveries, a retry after a failure, a dead letter after the last
attempt, and one sender per URL at a time."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from llmesh.common.audit import AuditAction, AuditEntry, AuditSource, AuditTrail
from services.eval import webhooks
from services.eval.webhooks import Failed, Webhooks
from tests.receiver import Receiver, serve, verified

pytestmark = pytest.mark.slow
SECRET = b"webhook-secret"


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def _serve(receivers: list[Receiver], statuses: list[int]) -> Receiver:
    receivers.append(serve(statuses))
    return receivers[-1]


@pytest.fixture
async def client(redis_port: int, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[redis.Redis]:
    monkeypatch.setattr(webhooks, "BACKOFF_S", 0.01)
    client = redis.Redis(port=redis_port, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


async def _record(client: redis.Redis, *actions: AuditAction) -> list[AuditEntry]:
    trail = AuditTrail(client)
    made = []
    for n, action in enumerate(actions):
        entry = AuditEntry(action=action, source=AuditSource.ADMIN_API, model="chat", version=n + 1, details={"mode": "swap"})
        made.append(await trail.append(entry))
    return [e for e in made if e is not None]


async def test_a_failed_delivery_is_retried_signed_and_only_notifications_are_sent(client, receivers):
    receiver = _serve(receivers, [500])
    rollback, _, refused = await _record(
        client, AuditAction.ROLLBACK_REQUESTED, AuditAction.KEY_CREATED, AuditAction.RELEASE_REFUSED
    )
    dead: list[Failed] = []
    hooks = Webhooks(client, [receiver.url], SECRET, 3, _collect(dead), "r1")

    assert await hooks.run_once() == 3
    assert [(status, headers["llmesh-delivery"]) for status, headers, _ in receiver.got] == [
        (500, rollback.id),
        (200, rollback.id),  # the retry
        (200, refused.id),  # key.created is not a notification
    ]
    for _, headers, body in receiver.got:
        assert verified(SECRET, headers, body)
        assert not verified(SECRET, headers, body + b" ")  # a changed body fails the check
    payload = json.loads(receiver.got[-1][2])
    assert payload["type"] == "release.refused" and AuditEntry.model_validate(payload["entry"]) == refused
    assert dead == []
    assert await hooks.run_once() == 0  # nothing new: nothing sent again
    assert len(receiver.got) == 3


async def test_a_receiver_that_keeps_failing_gets_a_dead_letter_and_the_rest_go_on(client, receivers):
    broken, working = _serve(receivers, [503] * 10), _serve(receivers, [])
    first, second = await _record(client, AuditAction.ROLLBACK_REQUESTED, AuditAction.POLICY_DECISION)
    dead: list[Failed] = []
    await Webhooks(client, [broken.url, working.url], SECRET, 3, _collect(dead), "r1").run_once()

    assert [f.entry.id for f in dead] == [first.id, second.id]
    assert all(f.url == broken.url and "answered 503 to 3 attempts" in f.reason for f in dead)
    assert len(broken.got) == 6
    assert [headers["llmesh-delivery"] for _, headers, _ in working.got] == [first.id, second.id]


async def test_one_replica_sends_to_a_url_at_a_time(client, receivers):
    receiver = _serve(receivers, [])
    await _record(client, AuditAction.ROLLBACK_REQUESTED)
    url_key = f"llmesh:webhook:{hashlib.sha256(receiver.url.encode()).hexdigest()[:16]}"
    await client.set(f"{url_key}:lease", "r2", px=60_000)  # another replica is sending
    assert await Webhooks(client, [receiver.url], SECRET, 3, _collect([]), "r1").run_once() == 0
    assert receiver.got == []
    await client.delete(f"{url_key}:lease")
    assert await Webhooks(client, [receiver.url], SECRET, 3, _collect([]), "r1").run_once() == 1
    assert len(receiver.got) == 1


def _collect(into: list[Failed]):  # type: ignore[no-untyped-def]
    async def dead_letter(failed: Failed) -> None:
        into.append(failed)

    return dead_letter
