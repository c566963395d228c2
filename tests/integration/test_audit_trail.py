"""The audit trail against a real redis-server: writers racing to append chain one after another,
an entry id is appended once, and a removed entry is found."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from llmesh.common.audit import LOG_KEY, AuditAction, AuditEntry, AuditSource, AuditTrail

pytestmark = pytest.mark.slow


@pytest.fixture
async def clients(redis_port: int) -> AsyncIterator[list[redis.Redis]]:
    clients = [redis.Redis(port=redis_port, decode_responses=True) for _ in range(4)]
    await clients[0].flushdb()
    yield clients
    for client in clients:
        await client.aclose()


def _entry(model: str, version: int, **fields: object) -> AuditEntry:
    return AuditEntry(action=AuditAction.RELEASE_APPLIED, source=AuditSource.KAFKA, model=model, version=version, **fields)  # type: ignore[arg-type]


async def test_racing_writers_make_one_chain(clients: list[redis.Redis]):
    trails = [AuditTrail(client) for client in clients]  # four writers, as four services would be
    await asyncio.gather(*(trails[i % 4].append(_entry(f"m{i % 3}", i)) for i in range(40)))

    entries = await trails[0].entries()
    assert len(entries) == 40 and await trails[1].verify() == []
    assert sorted(e.version for e in entries) == list(range(40))
    assert [e.version for e in await trails[0].entries(model="m1")] == [e.version for e in entries if e.model == "m1"]


async def test_an_entry_id_is_appended_once(clients: list[redis.Redis]):
    trail = AuditTrail(clients[0])
    first = await trail.append(_entry("chat", 1, id="release-applied:event-1"))
    again = await trail.append(_entry("chat", 1, id="release-applied:event-1", reason="a replay"))
    assert first is not None and again is None
    assert [e.id for e in await trail.entries()] == ["release-applied:event-1"]


async def test_an_entry_removed_from_the_store_is_found(clients: list[redis.Redis]):
    trail = AuditTrail(clients[0])
    for version in range(1, 5):
        await trail.append(_entry("chat", version))
    assert await trail.verify() == []
    doomed = await clients[1].lindex(LOG_KEY, 1)
    await clients[1].lrem(LOG_KEY, 1, doomed)  # what someone with Redis access might do
    problems = await trail.verify()
    assert problems and "removed" in problems[0]
    assert [e.version for e in await trail.entries(since=0)] == [1, 3, 4]
