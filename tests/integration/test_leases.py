"""infer's leases against a real redis-server: a task runs once however often it is read, and the
requests of a replica whose heartbeat stopped are taken over by a live one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from llmesh.common.fleet import REPLICAS, claim_key, leases_key
from llmesh.v1 import events_pb2
from services.infer.leases import Lease, ReplicaLeases

pytestmark = pytest.mark.slow


@pytest.fixture
async def client(redis_port: int) -> AsyncIterator[redis.Redis]:
    client = redis.Redis(port=redis_port, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


def lease(request_id: str, *, stream: bool = False, deadline_in_s: float = 30) -> Lease:
    task = events_pb2.InferTask(
        request_id=request_id, model="chat", version=1, prompt_ids=[1, 2], stream=stream,
        deadline_unix_ms=int((time.time() + deadline_in_s) * 1000),
    )  # fmt: skip
    return Lease(task, reply_to="llmesh.replies.g1", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")


class Settled:
    def __init__(self) -> None:
        self.requeued: list[Lease] = []
        self.unavailable: list[tuple[Lease, str]] = []

    async def requeue(self, lease: Lease) -> None:
        self.requeued.append(lease)

    async def answer_unavailable(self, lease: Lease, reason: str) -> None:
        self.unavailable.append((lease, reason))


async def test_a_task_read_twice_is_claimed_once(client: redis.Redis):
    one, two = ReplicaLeases(client, "r1"), ReplicaLeases(client, "r2")
    assert await one.claim(lease("req-1"))
    assert not await one.claim(lease("req-1"))
    assert not await two.claim(lease("req-1")), "another replica reading it again does not run it"
    await one.done("req-1")
    assert not await two.claim(lease("req-1")), "the claim outlives the answer: a late redelivery does not run"
    assert await client.hlen(leases_key("r1")) == 0


async def test_a_dead_replicas_requests_are_requeued_or_answered_unavailable(client: redis.Redis):
    dead = ReplicaLeases(client, "dead")
    await client.sadd(REPLICAS, "dead")  # it started once; its heartbeat is gone (never beat here)
    for request in (lease("unary"), lease("stream", stream=True), lease("late", deadline_in_s=-1)):
        assert await dead.claim(request)
    settled = Settled()
    live = ReplicaLeases(client, "live", heartbeat_s=0.1)
    await live.start(settled.requeue, settled.answer_unavailable)
    try:
        for _ in range(50):
            if settled.requeued and settled.unavailable:
                break
            await asyncio.sleep(0.1)
    finally:
        await live.stop()
    assert [s.task.request_id for s in settled.requeued] == ["unary"]
    assert settled.requeued[0].reply_to == "llmesh.replies.g1" and list(settled.requeued[0].task.prompt_ids) == [1, 2]
    assert [(s.task.request_id, "died mid-stream" in why) for s, why in settled.unavailable] == [("stream", True)]
    assert await client.get(claim_key("unary")) is None, "released, so the requeued task can be claimed again"
    assert not await client.exists(leases_key("dead"))
    assert not await client.sismember(REPLICAS, "dead")


async def test_a_live_replicas_requests_are_left_alone(client: redis.Redis):
    settled = Settled()
    busy = ReplicaLeases(client, "busy", heartbeat_s=0.1)
    await busy.start(settled.requeue, settled.answer_unavailable)
    other = ReplicaLeases(client, "other", heartbeat_s=0.1)
    await other.start(settled.requeue, settled.answer_unavailable)
    try:
        assert await busy.claim(lease("running"))
        await asyncio.sleep(0.5)
    finally:
        await other.stop()
        await busy.stop()
    assert not settled.requeued and not settled.unavailable


async def test_a_replica_starting_afresh_settles_its_own_old_leases(client: redis.Redis):
    before = ReplicaLeases(client, "same-pid")
    assert await before.claim(lease("unary"))
    settled = Settled()
    after = ReplicaLeases(client, "same-pid")
    await after.start(settled.requeue, settled.answer_unavailable)
    await after.stop()
    assert [s.task.request_id for s in settled.requeued] == ["unary"]
