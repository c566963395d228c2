"""eval's join buffer against a real redis-server: pairs complete once, lonely answers are counted
missing after the TTL, and an answer that comes after that is late, not a new pair."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from services.eval.pairs import LATE, PairJoin, Side

pytestmark = pytest.mark.slow


@pytest.fixture
async def join(redis_port: int) -> AsyncIterator[PairJoin]:
    client = redis.Redis(port=redis_port, decode_responses=True)
    await client.flushdb()
    yield PairJoin(client, ttl_s=0.3)
    await client.aclose()


def _side(version: int, text: str = "x") -> Side:
    return Side("chat", version, text, 10.0, False)


async def test_a_pair_completes_once(join: PairJoin):
    assert await join.add("r1", "answer", _side(1, "a")) is None
    sides = await join.add("r1", "mirror", _side(2, "b"))
    assert isinstance(sides, dict) and {s.text for s in sides.values()} == {"a", "b"}
    assert await join.sweep() == []


async def test_a_lonely_answer_is_missing_and_its_late_partner_is_late(join: PairJoin):
    assert await join.add("r2", "answer", _side(1)) is None
    await asyncio.sleep(0.4)
    assert await join.sweep() == [_side(1)]
    assert await join.add("r2", "mirror", _side(2)) == LATE
    await asyncio.sleep(0.4)
    assert await join.sweep() == [], "a late answer must not be counted missing again"
