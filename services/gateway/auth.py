"""API keys on the gateway: who calls (x-api-key or `authorization: Bearer`), whether the method's
scope allows it, and how much of the key's rate and token budget is left."""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from llmesh.common.apikeys import ApiKey, ApiKeyStore, Scope
from llmesh.common.outages import refusal, same_kind

CALLER: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("llmesh_caller", default=None)
SCOPES = {"/llmesh.v1.Gateway/": Scope.GENERATE, "/llmesh.v1.Admin/": Scope.ADMIN}  # others (health, reflection): open
CACHE_S = 2.0  # a revoked key stops working within this long


class QuotaExceeded(Exception):
    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(f"{what}; retry after {retry_after_s:.2f}s")
        self.retry_after_s = retry_after_s

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after-ms", str(math.ceil(self.retry_after_s * 1000))),)


def secret_of(metadata: dict[str, str]) -> str:
    if key := metadata.get("x-api-key"):
        return key
    scheme, _, token = metadata.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class KeyCheck(grpc.aio.ServerInterceptor):
    """Refuses calls without a live key holding the method's scope (UNAUTHENTICATED,
    PERMISSION_DENIED); the handler finds the caller's key in CALLER."""

    def __init__(self, keys: ApiKeyStore) -> None:
        self.keys = keys
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        scope = next((s for prefix, s in SCOPES.items() if method.startswith(prefix)), None)
        if scope is None or handler is None:
            return handler
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        secret = secret_of(metadata)
        key = await self._find(secret) if secret else None
        if key is None:
            reason = "this API key is not valid (revoked or unknown)" if secret else "an API key is required (x-api-key)"
            return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, reason)
        if scope not in key.scopes:
            return refusal(handler, grpc.StatusCode.PERMISSION_DENIED, f"key {key.id} lacks the {scope.value!r} scope")
        return _as_caller(handler, key)

    async def _find(self, secret: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._cache.get(secret)
        if cached is not None and now - cached[1] < CACHE_S:
            return cached[0]
        key = await self.keys.find(secret)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[secret] = (key, now)
        return key


def _as_caller(handler: grpc.RpcMethodHandler, key: ApiKey) -> grpc.RpcMethodHandler:
    unary, stream = handler.unary_unary, handler.unary_stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        CALLER.set(key)
        return await unary(request, context)

    async def call_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        CALLER.set(key)
        async for item in stream(request, context):
            yield item

    return same_kind(handler, call, call_stream)


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
