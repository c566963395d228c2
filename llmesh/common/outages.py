"""A service whose Redis or broker is unreachable answers UNAVAILABLE (retry later), never UNKNOWN;
any other failure of a handler answers INTERNAL with a short fixed message and an error id (the
traceback is logged under that id), never the exception's text."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError
from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("llmesh.outages")
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
BROKER_ERRORS = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError)
OUTAGE_ERRORS = REDIS_ERRORS + BROKER_ERRORS
ANY_UNARY = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
ANSWERED = Counter("llmesh_outage_unavailable_total", "Calls answered UNAVAILABLE because a dependency was down", ["dependency"])
FAILED = Counter("llmesh_grpc_internal_errors_total", "Calls or tasks answered INTERNAL because they failed unexpectedly")


def describe(err: Exception) -> tuple[str, str]:
    """(dependency, message for the caller) of an outage error."""
    dependency = "redis" if isinstance(err, REDIS_ERRORS) else "broker"
    what = "the registry (Redis)" if dependency == "redis" else "the Kafka broker"
    return dependency, f"{what} is unreachable ({type(err).__name__}); retry later"  # the error's text only in the log


class OutageStatus(grpc.aio.ServerInterceptor):
    """Turns an outage error raised by a handler (or a later interceptor) into UNAVAILABLE, and any
    other unexpected exception into INTERNAL with an error id (`internal_error`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        try:
            handler = await continuation(details)
        except OUTAGE_ERRORS as err:
            return refusal(ANY_UNARY, grpc.StatusCode.UNAVAILABLE, _answered(err))  # the status is all the caller sees
        except Exception as err:
            return refusal(ANY_UNARY, grpc.StatusCode.INTERNAL, internal_error(details.method, err))
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        unary, stream = handler.unary_unary, handler.unary_stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await unary(request, context)
            except OUTAGE_ERRORS as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, _answered(err))
            except grpc.aio.AbortError:
                raise  # the handler's own status
            except Exception as err:
                await context.abort(grpc.StatusCode.INTERNAL, internal_error(details.method, err))

        async def call_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in stream(request, context):
                    yield item
            except OUTAGE_ERRORS as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, _answered(err))
            except grpc.aio.AbortError:
                raise
            except Exception as err:
                await context.abort(grpc.StatusCode.INTERNAL, internal_error(details.method, err))

        return same_kind(handler, call, call_stream)


def internal_error(where: str | bytes | None, err: BaseException) -> str:
    """Log `err` with its traceback under a new error id; the caller's message: fixed text and the id.
    `where`: the gRPC method (or the work) that failed, for the log."""
    name = (where.decode(errors="replace") if isinstance(where, bytes) else str(where or "?"))[:200]
    error_id = uuid.uuid4().hex[:16]
    FAILED.inc()  # no method label: a client names the method, registered or not
    log.error("failed unexpectedly", extra={"where": name, "error_id": error_id}, exc_info=err)
    return f"internal error (error id {error_id}); the service logged it, retry or report the id"


def unexpected(where: str, err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message for a caller of an exception no handler expected: UNAVAILABLE for an
    outage (counted), else INTERNAL with an error id; for transports other than gRPC's interceptor."""
    if isinstance(err, OUTAGE_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, _answered(err)
    return grpc.StatusCode.INTERNAL, internal_error(where, err)


def _answered(err: Exception) -> str:
    dependency, message = describe(err)
    ANSWERED.labels(dependency).inc()
    log.warning("answered UNAVAILABLE", extra={"dependency": dependency, "error": str(err)})
    return message


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers every call with `code` and `message`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    return same_kind(handler, refuse, refuse_stream)


def same_kind(handler: grpc.RpcMethodHandler, unary: Callable[..., Any], stream: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """`unary` or `stream` as a handler of the same kind (and serializers) as `handler`."""
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    if handler.unary_unary is None:
        raise TypeError("only unary and server-streaming methods are wrapped")
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
