"""API keys on every service's gRPC API (when `api_keys_required`): who calls (x-api-key or
`authorization: Bearer`) and whether the key holds a scope the method accepts.

Each of our services maps to the scopes that may call it; health and reflection stay open (probes
and tools carry no key); any other method, ours or not, needs an admin key (deny by default).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from llmesh.common.apikeys import ApiKey, Scope
from llmesh.common.outages import refusal, same_kind

CALLER: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("llmesh_caller", default=None)
# Method prefix -> the scopes any one of which lets a key call it.
SCOPES: dict[str, tuple[Scope, ...]] = {  # the first prefix that matches decides
    "/llmesh.v1.Admin/Approve": (Scope.APPROVE,),  # approving is a duty apart from releasing
    "/llmesh.v1.Admin/Reject": (Scope.APPROVE,),
    "/llmesh.v1.Gateway/": (Scope.GENERATE,),  # Generate, GenerateStream, ListModels, GetModel
    "/llmesh.v1.Tokenizer/": (Scope.GENERATE,),  # Tokenize, CountTokens: part of generating
    "/llmesh.v1.Eval/": (Scope.READ, Scope.ADMIN),  # GetReport: usage of the caller's own key unless admin
    "/llmesh.v1.Admin/": (Scope.ADMIN,),  # releases and rollbacks
    "/llmesh.v1.Infer/": (Scope.ADMIN,),  # internal: what a replica has loaded
}
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
DEFAULT_SCOPES = (Scope.ADMIN,)  # any method not named above
CACHE_S = 2.0  # a revoked key stops working within this long


def caller_name(otherwise: str) -> str:
    """The name of the calling key, or `otherwise` when keys are not required."""
    caller = CALLER.get()
    return caller.name if caller else otherwise


class KeyFinder(Protocol):
    async def find(self, secret: str) -> ApiKey | None: ...


def scopes_for(method: str) -> tuple[Scope, ...]:
    """The scopes that may call `method` (a full method name, `/package.Service/Method`); () when open."""
    if method.startswith(OPEN):
        return ()
    return next((scopes for prefix, scopes in SCOPES.items() if method.startswith(prefix)), DEFAULT_SCOPES)


def secret_of(metadata: dict[str, str]) -> str:
    if key := metadata.get("x-api-key"):
        return key
    scheme, _, token = metadata.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Refused(Exception):
    """A caller without a live key holding the scope: UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class KeyRing:
    """Who calls, by the secret they present, and whether their key holds a scope; shared by the
    gRPC interceptor below and the gateway's HTTP API, so both check keys the same way."""

    def __init__(self, keys: KeyFinder) -> None:
        self.keys = keys
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def authorize(self, secret: str, scopes: tuple[Scope, ...]) -> ApiKey:
        """The live key of `secret` holding one of `scopes`; else Refused."""
        key = await self._find(secret) if secret else None
        if key is None:
            reason = "this API key is not valid (revoked or unknown)" if secret else "an API key is required (x-api-key)"
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, reason)
        if not any(scope in key.scopes for scope in scopes):
            wanted = " or ".join(repr(scope.value) for scope in scopes)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"key {key.id} lacks the {wanted} scope")
        return key

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


class KeyCheck(grpc.aio.ServerInterceptor):
    """Refuses calls without a live key holding one of the method's scopes (UNAUTHENTICATED,
    PERMISSION_DENIED); the handler finds the caller's key in CALLER."""

    def __init__(self, keys: KeyFinder) -> None:
        self.ring = KeyRing(keys)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        scopes = scopes_for(details.method)
        if not scopes or handler is None:
            return handler
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        try:
            key = await self.ring.authorize(secret_of(metadata), scopes)
        except Refused as refused:
            return refusal(handler, refused.code, refused.message)
        return _as_caller(handler, key)


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
