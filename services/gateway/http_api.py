"""The gateway's OpenAI-compatible HTTP API: FastAPI on uvicorn, on the gateway's own event loop, over
the same data plane as gRPC. Each route checks the key, turns the JSON into a GenerationRequest, and
turns the chunks (or the GenerationError) into OpenAI's JSON or Server-Sent Events.

Errors before the first token get their own HTTP status (the first chunk is awaited before the
response starts); an error after it ends the event stream with an `error` event. A client that goes
away cancels its generation in infer, streaming or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmesh.common.apikeys import ApiKey
from llmesh.common.apikeys import Scope as KeyScope
from llmesh.common.feedback import FeedbackInput
from llmesh.common.keycheck import KeyRing, Refused, secret_of
from llmesh.common.outages import unexpected
from llmesh.common.validation import bounded, shown
from llmesh.v1 import events_pb2
from services.gateway.dataplane import DataPlane, GenerationError, GenerationRequest, Outcome, Prompt
from services.gateway.openai_protocol import (
    AnswerHead,
    Api,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    error_body,
    model_entries,
)
from services.gateway.settings import GatewaySettings

log = logging.getLogger("llmesh.gateway.http")
T = TypeVar("T")
Chunks = AsyncGenerator[tuple[Outcome, events_pb2.TextChunk], None]
RESPONSES = Counter("llmesh_gateway_http_responses_total", "HTTP API responses by route and status", ["route", "status"])
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class HttpApi:
    def __init__(self, plane: DataPlane, settings: GatewaySettings, keys: KeyRing | None) -> None:
        self.plane, self.settings, self.keys = plane, settings, keys
        self.app = self._routes()
        self.server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the settings' address (bound here, so a taken port fails start-up by name)."""
        family = socket.AF_INET6 if ":" in self.settings.http_host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say TCP (with proto 0, Nagle
        # holds the body written after the headers for the client's delayed ACK, 40 ms a response)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
        try:
            sock.bind((self.settings.http_host, self.settings.http_port))
        except OSError as err:
            sock.close()
            raise RuntimeError(
                f"the HTTP API cannot listen on {self.settings.http_host}:{self.settings.http_port}: {err}"
            ) from err
        self.port = sock.getsockname()[1]
        app = BodyLimit(self.app, self.settings.http_max_body_bytes)
        tls = self.settings.tls_cert_file, self.settings.tls_key_file  # TLS for gRPC is TLS for HTTP too
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            http="httptools",
            server_header=False,
            ssl_certfile=tls[0],
            ssl_keyfile=tls[1],
        )
        self.server = EmbeddedServer(config)
        self._serving = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._serving.done():
                await self._serving  # its error
                raise RuntimeError("the HTTP API stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("HTTP API listening", extra={"http": f"{self.settings.http_host}:{self.port}"})

    async def stop(self, grace: float) -> None:
        """Stop accepting; answers in flight (streams included) get `grace` seconds to finish."""
        if self.server is None or self._serving is None:
            return
        self.server.config.timeout_graceful_shutdown = math.ceil(grace)
        self.server.should_exit = True
        await self._serving

    # ---- routes ------------------------------------------------------------------------------

    def _routes(self) -> FastAPI:
        app = FastAPI(title="llmesh", docs_url=None, redoc_url=None, openapi_url=None)
        key = Depends(self._authorize)  # solved before the body is checked: without a key, 401 (not 400)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request, caller: ApiKey | None = key) -> Response:
            max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
            return await self._generate(Api.CHAT, body, body.messages, max_tokens, caller, request)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request, caller: ApiKey | None = key) -> Response:
            return await self._generate(Api.COMPLETIONS, body, body.text(), body.max_tokens, caller, request)

        @app.get("/v1/models")
        async def list_models(caller: ApiKey | None = key) -> Response:
            return JSONResponse({"object": "list", "data": model_entries(await self.plane.models())})

        @app.get("/v1/models/{model_id}")
        async def get_model(model_id: str, caller: ApiKey | None = key) -> Response:
            entries = model_entries([await self.plane.model(model_id.partition("@")[0])])
            if entry := next((entry for entry in entries if entry["id"] == model_id), None):
                return JSONResponse(entry)
            raise GenerationError(grpc.StatusCode.NOT_FOUND, f"model {shown(model_id)} is not served")

        @app.post("/v1/feedback")
        async def feedback(body: FeedbackInput, caller: ApiKey | None = key) -> Response:
            """A rating of an answer: `request_id` is the completion's id (or its x-request-id header)."""
            plain = body.model_copy(update={"request_id": body.request_id.removeprefix("chatcmpl-").removeprefix("cmpl-")})
            reply = await self.plane.feedback(plain, caller)
            return JSONResponse({"object": "feedback", "request_id": reply.request_id, "model": f"{reply.model}@{reply.version}"})

        @app.get("/healthz")
        async def live() -> Response:
            return JSONResponse({"status": "ok"})

        @app.get("/readyz")
        async def ready() -> Response:
            draining = self.server is not None and self.server.should_exit
            return JSONResponse({"status": "draining" if draining else "ok"}, status_code=503 if draining else 200)

        app.add_exception_handler(GenerationError, _generation_error)  # type: ignore[arg-type]
        app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, _invalid_body)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, _unexpected)
        return app

    async def _authorize(self, request: Request) -> ApiKey | None:
        if self.keys is None:
            return None
        return await self.keys.authorize(secret_of(dict(request.headers)), (KeyScope.GENERATE,))

    async def _generate(
        self, api: Api, body: OpenAIRequest, prompt: Prompt, max_tokens: int | None, caller: ApiKey | None, request: Request
    ) -> Response:
        if why := body.unsupported():
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, why)
        chunks = self.plane.generate(
            GenerationRequest(
                model=body.model,
                prompt=prompt,
                sampling=body.sampling(max_tokens),
                stream=body.stream,
                caller=caller,
                client_key=secret_of(dict(request.headers)) or body.user or "",
                traceparent=request.headers.get("traceparent"),
                scenario=body.scenario or request.headers.get("x-scenario", ""),
                variables=body.variables or {},
                timeout_s=_client_timeout(request),
            )
        )
        try:  # the first chunk before the response starts: every refusal keeps its own HTTP status
            outcome, first = await until_disconnect(request.receive, anext(chunks))
        except GenerationError as err:
            err.message = err.message.replace("sampling.", "")  # the HTTP API names the fields flat
            raise
        except ClientGone:
            return Response(status_code=499)
        head = AnswerHead(outcome.request_id, outcome.route.model, outcome.route.version)
        headers = {"x-request-id": outcome.request_id, "llmesh-version": head.fingerprint}
        if outcome.template_version:
            headers["llmesh-template-version"] = str(outcome.template_version)
        if body.stream:
            events = _events(api, head, first, chunks, body.include_usage)
            return EventStream(events, chunks, headers=headers | STREAM_HEADERS, media_type="text/event-stream")
        try:
            answer = await until_disconnect(request.receive, _whole(api, head, first, chunks))
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(answer, headers=headers)


async def _whole(api: Api, head: AnswerHead, first: events_pb2.TextChunk, chunks: Chunks) -> dict[str, Any]:
    parts, final = [first.text], first
    async for _, chunk in chunks:  # to the end: the data plane records the request as it finishes
        parts.append(chunk.text)
        final = chunk
    return api.answer(head, "".join(parts), final)


async def _events(
    api: Api, head: AnswerHead, first: events_pb2.TextChunk, chunks: Chunks, with_usage: bool
) -> AsyncIterator[str]:
    final = first
    yield _event(api.delta(head, first, True, with_usage))
    try:
        async for _, chunk in chunks:
            yield _event(api.delta(head, chunk, False, with_usage))
            final = chunk
    except GenerationError as err:  # the status line is sent: the error travels as an event
        yield _event(error_body(err.code, err.message)[1])
        return
    except Exception as err:  # a broker or Redis outage, a bug: an event too, never a silent end
        code, message = unexpected("/v1 stream", err)
        yield _event(error_body(code, message)[1])
        return
    if with_usage:
        yield _event(api.usage_chunk(head, final))
    yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _client_timeout(request: Request) -> float | None:
    """The client's own timeout, which the openai SDKs send (x-stainless-timeout, seconds)."""
    try:
        seconds = float(request.headers.get("x-stainless-timeout", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """`work`'s result; ClientGone (with `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(_disconnected(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, GenerationError):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-Sent Events that stop, and cancel the generation, when the client goes away."""

    def __init__(self, events: AsyncIterator[str], chunks: Chunks, **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def pump() -> None:
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": str(event).encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(receive, pump())
        except (ClientGone, OSError):
            pass
        finally:  # a stream left at a chunk: closing it tells the data plane the client went away
            await self.chunks.aclose()


class BodyLimit:
    """Refuses request bodies above `limit` bytes with 413, before they are read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, status = scope.get("path", ""), [0]
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            await _too_large(self.limit, send)
            RESPONSES.labels(_route_label(route), "413").inc()
            return
        body, more = bytearray(), True
        while more:  # read whole first: FastAPI turns an error raised in its receive into a bare 400
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:  # a chunked body, without a content-length
                await _too_large(self.limit, send)
                RESPONSES.labels(_route_label(route), "413").inc()
                return
        replay: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def limited() -> Message:
            return replay.pop() if replay else await receive()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, limited, counted)
        RESPONSES.labels(_route_label(route), str(status[0])).inc()


async def _too_large(limit: int, send: Send) -> None:
    body = json.dumps(error_body(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is over {limit} bytes")[1]).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _route_label(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz")
    return next((route for route in known if path.startswith(route)), "other")


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside a service: the service's own SIGTERM handling stops it (through `stop`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# ---- errors as OpenAI's JSON -----------------------------------------------------------------


def _error(code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> JSONResponse:
    status, body = error_body(code, bounded(message))
    headers = {}
    if retry_after_s is not None:
        headers = {"retry-after": str(math.ceil(retry_after_s)), "retry-after-ms": str(math.ceil(retry_after_s * 1000))}
    return JSONResponse(body, status_code=status, headers=headers)


async def _generation_error(request: Request, err: GenerationError) -> JSONResponse:
    return _error(err.code, err.message, err.retry_after_s)


async def _refused(request: Request, err: Refused) -> JSONResponse:
    message = err.message.replace("(x-api-key)", "(Authorization: Bearer <key>)")
    return _error(err.code, message)


async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    """The first problem of the body, by field, without echoing more than a little of what was sent."""
    problems = err.errors()
    if not problems:
        return _error(grpc.StatusCode.INVALID_ARGUMENT, "the request body is not valid")
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    message = f"{where}: {first.get('msg', 'invalid')}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {shown(first['input'])})"
    if len(problems) > 1:
        message += f"; and {len(problems) - 1} more problem(s)"
    return _error(grpc.StatusCode.INVALID_ARGUMENT, message)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods, in OpenAI's error shape too."""
    code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
        err.status_code, grpc.StatusCode.INVALID_ARGUMENT
    )
    _, body = error_body(code, f"{request.method} {shown(request.url.path)}: {err.detail}")
    return JSONResponse(body, status_code=err.status_code)


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    return _error(*unexpected(request.url.path, err))
