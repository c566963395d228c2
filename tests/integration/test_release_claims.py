"""Release-event bookkeeping and routing flips against a real redis-server: one replica applies an
event for the whole mesh, the others wait for it, a replay changes nothing, a dead replica's claim
lapses, and of several replicas flipping the routing at once exactly one wins."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmesh.common.registry import EventClaim, Registry, Routing, connect, event_key

pytestmark = pytest.mark.slow


@pytest.fixture
async def registry(redis_port: int) -> AsyncIterator[Registry]:
    registry = Registry(connect(f"redis://127.0.0.1:{redis_port}/0"))
    await registry.redis.flushdb()
    yield registry
    await registry.close()


async def test_one_replica_applies_the_others_wait_then_see_a_replay(registry: Registry):
    assert await registry.claim_event("e1", 7, "infer-a", hold_s=5) is EventClaim.NEW
    assert await registry.claim_event("e1", 7, "infer-b", hold_s=5) is EventClaim.APPLYING
    await registry.commit("chat", Routing(primary=2, previous=1), "e1", 7)
    assert await registry.claim_event("e1", 7, "infer-b", hold_s=5) is EventClaim.REPLAY
    assert await registry.claim_event("e1", 9, "infer-b", hold_s=5) is EventClaim.DUPLICATE
    assert (await registry.desired("chat")).primary == 2
    assert await registry.redis.ttl(event_key("e1")) == -1, "an applied mark never expires"


async def test_a_dead_replicas_claim_lapses_and_renewing_never_touches_an_applied_mark(registry: Registry):
    assert await registry.claim_event("e2", 3, "infer-a", hold_s=0.3) is EventClaim.NEW
    await registry.hold_claim("e2", 0.3)
    await asyncio.sleep(0.5)  # infer-a died: it renews no more
    assert await registry.claim_event("e2", 3, "infer-b", hold_s=5) is EventClaim.NEW
    await registry.commit("chat", Routing(primary=1), "e2", 3)
    await registry.hold_claim("e2", 0.3)  # a late renewal of the lapsed claim
    assert await registry.redis.ttl(event_key("e2")) == -1
    assert await registry.claim_event("e2", 3, "infer-a", hold_s=5) is EventClaim.REPLAY


async def test_of_replicas_flipping_at_once_exactly_one_wins(registry: Registry):
    assert await registry.flip_primary("chat", 1, expected=0)
    wins = await asyncio.gather(*(registry.flip_primary("chat", 2, expected=1) for _ in range(8)))
    assert sum(wins) == 1
    routing = await registry.routing("chat")
    assert (routing.primary, routing.previous) == (2, 1) and routing.flipped_at > 0
    assert not await registry.flip_primary("chat", 3, expected=1), "a flip from a stale view is refused"


async def test_a_candidate_is_set_and_cleared_once(registry: Registry):
    assert await registry.set_candidate("chat", 3, "canary", 30)
    assert not await registry.set_candidate("chat", 3, "canary", 30)
    assert await registry.set_candidate("chat", 3, "canary", 50)
    routing = await registry.routing("chat")
    assert (routing.candidate, routing.candidate_mode, routing.candidate_share) == (3, "canary", 50)
    assert await registry.set_candidate("chat", 0, "", 0)
    assert not await registry.set_candidate("chat", 0, "", 0)
    assert (await registry.routing("chat")).candidate == 0
