"""API keys, scopes and quotas against a real redis-server: secrets are stored hashed, revoked keys
stop working, and the token buckets refuse with the time to wait, then refill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from llmesh.common.apikeys import DIGESTS, KEYS, ApiKeyStore, Scope, digest
from services.gateway.auth import QuotaExceeded, Quotas

pytestmark = pytest.mark.slow


@pytest.fixture
async def store(redis_port: int) -> AsyncIterator[ApiKeyStore]:
    client = redis.Redis(port=redis_port, decode_responses=True)
    await client.flushdb()
    yield ApiKeyStore(client)
    await client.aclose()


async def test_the_secret_is_never_stored_and_revocation_ends_it(store: ApiKeyStore):
    key, secret = await store.create("ci", [Scope.GENERATE, Scope.ADMIN])
    stored = " ".join([*(await store.redis.hgetall(KEYS)).values(), *(await store.redis.hgetall(DIGESTS))])
    assert secret not in stored and secret.split("_")[-1] not in stored
    assert key.digest == digest(secret) and key.scopes == [Scope.ADMIN, Scope.GENERATE]
    assert (await store.find(secret)) == key
    assert await store.find(secret + "x") is None
    revoked = await store.revoke(key.id)
    assert revoked is not None and revoked.revoked_at > 0
    assert await store.find(secret) is None
    assert [k.id for k in await store.list()] == [key.id]  # kept, marked revoked
    assert await store.revoke("nope") is None


async def test_requests_per_second_refuses_with_the_wait_then_refills(store: ApiKeyStore):
    key, _ = await store.create("limited", [Scope.GENERATE], requests_per_second=2)
    quotas = Quotas(store)
    await quotas.admit(key, tokens=10)
    await quotas.admit(key, tokens=10)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(key, tokens=10)
    assert 0 < refused.value.retry_after_s <= 0.5
    assert dict(refused.value.trailers())["retry-after-ms"].isdigit()
    await asyncio.sleep(refused.value.retry_after_s + 0.05)
    await quotas.admit(key, tokens=10)


async def test_tokens_per_minute_holds_the_estimate_and_gives_back_the_unused(store: ApiKeyStore):
    key, _ = await store.create("tokens", [Scope.GENERATE], tokens_per_minute=600)  # 10 tokens a second
    quotas = Quotas(store)
    await quotas.admit(key, tokens=500)  # prompt + max_tokens held while it runs
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(key, tokens=400)
    assert refused.value.retry_after_s > 25  # 300 tokens short at 10 a second
    await quotas.settle(key, held=500, prompt_tokens=20, completion_tokens=30)  # 450 unused come back
    await quotas.admit(key, tokens=400)
    usage = await store.usage(key.id)
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (1, 20, 30)


async def test_a_request_bigger_than_the_budget_runs_when_the_bucket_is_full(store: ApiKeyStore):
    key, _ = await store.create("small", [Scope.GENERATE], tokens_per_minute=60)
    await Quotas(store).admit(key, tokens=1000)
    with pytest.raises(QuotaExceeded):
        await Quotas(store).admit(key, tokens=1)
