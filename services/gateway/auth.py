"""API keys on the gateway: how much of the caller's rate and token budget is left. (Who calls
and whether the method's scope allows it: llmesh/common/keycheck.py, on every service.)"""

from __future__ import annotations

import math

from llmesh.common.apikeys import ApiKey, ApiKeyStore


class QuotaExceeded(Exception):
    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(f"{what}; retry after {retry_after_s:.2f}s")
        self.retry_after_s = retry_after_s

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after-ms", str(math.ceil(self.retry_after_s * 1000))),)


class Quotas:
    """A key's requests per second and tokens per minute, as Redis token buckets shared by every
    gateway. A request holds its prompt plus `max_tokens` of the token budget while it runs and
    gives back what it did not generate."""

    def __init__(self, keys: ApiKeyStore) -> None:
        self.keys = keys

    async def admit(self, key: ApiKey, tokens: int) -> None:
        if rate := key.requests_per_second:
            wait = await self.keys.take(key, "requests", rate, max(1.0, rate), cost=1, need=1)
            if wait:
                raise QuotaExceeded(f"key {key.id} is limited to {rate:g} requests per second", wait)
        if per_minute := key.tokens_per_minute:
            need = min(tokens, per_minute)  # a request bigger than the budget still runs when the bucket is full
            wait = await self.keys.take(key, "tokens", per_minute / 60, per_minute, cost=tokens, need=need)
            if wait:
                raise QuotaExceeded(f"key {key.id} is limited to {per_minute} tokens per minute", wait)

    async def settle(self, key: ApiKey, held: int, prompt_tokens: int, completion_tokens: int) -> None:
        if key.tokens_per_minute and (unused := held - prompt_tokens - completion_tokens) > 0:
            per_minute = key.tokens_per_minute
            await self.keys.take(key, "tokens", per_minute / 60, per_minute, cost=-unused, need=-1e18)
        await self.keys.record_usage(key.id, prompt_tokens, completion_tokens)
