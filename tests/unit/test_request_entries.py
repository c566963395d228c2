"""Each entry of client requests applies the shared validation and answers with a bounded status of
its own, never a Python exception's text: tokenize's Kafka entry (in memory, FastStream's
TestKafkaBroker) and gRPC methods, the gateway's Generate, any gRPC handler that fails (the
OutageStatus interceptor), and infer when a request's deadline passes inside Triton."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from faststream.kafka import TestKafkaBroker

from llmesh.common import topics
from llmesh.common.outages import OutageStatus
from llmesh.common.topics import Header
from llmesh.common.validation import MAX_MESSAGE_CHARS
from llmesh.v1 import events_pb2, gateway_pb2, tokenize_pb2
from services.gateway.app import GatewayService
from services.gateway.settings import GatewaySettings
from services.infer.app import InferService
from services.infer.triton import TritonGenerator
from services.tokenize.app import TokenizeService
from services.tokenize.settings import TokenizeSettings

REPLIES = "test.replies"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    """Enough of grpc.aio.ServicerContext for a handler that refuses a request."""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details)

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float | None:
        return None


# ---- tokenize: the Kafka entry for text -------------------------------------------------------------


def _task(**sampling: Any) -> events_pb2.GenerateTask:
    fields = {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "seed": 5} | sampling
    return events_pb2.GenerateTask(
        request_id="kafka-1", model="chat", version=1, prompt="Return", sampling=events_pb2.ResolvedSampling(**fields)
    )


async def _kafka_replies(task: events_pb2.GenerateTask) -> list[events_pb2.TextChunk]:
    service = TokenizeService(TokenizeSettings())
    replies: list[events_pb2.TextChunk] = []

    @service.broker.subscriber(REPLIES)
    async def collect(body: bytes) -> None:
        replies.append(events_pb2.TextChunk.FromString(body))

    async with TestKafkaBroker(service.broker) as broker:
        await broker.publish(
            task.SerializeToString(), topics.GENERATE_REQUESTS, key=b"kafka-1", headers={Header.REPLY_TO: REPLIES}
        )
    return replies


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"temperature": math.nan}, "sampling.temperature"),  # before: INTERNAL from Triton
        ({"max_tokens": 0}, "sampling.max_tokens"),  # before: an empty OK
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"stop": [""]}, "sampling.stop"),
    ],
)
async def test_the_kafka_entry_refuses_bad_sampling_with_invalid_argument(sampling, field):
    [reply] = await _kafka_replies(_task(**sampling))
    assert reply.final and reply.request_id == "kafka-1"
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field in reply.error.message


async def test_the_kafka_entry_refuses_a_100kb_model_name_with_a_bounded_message():
    task = _task()
    task.model = "m" * 100_000
    [reply] = await _kafka_replies(task)
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "model name must be" in reply.error.message and len(reply.error.message) < 300


@pytest.mark.parametrize(
    ("request_id", "reply_to", "reason"),
    [
        ("r" * 129, REPLIES, "lacks a request_id (1 to 128 characters)"),
        ("kafka-1", "llmesh.replies.gw1", "names a mesh topic as reply-to"),  # answering in a gateway's name
        ("kafka-1", topics.SHADOW_RESULTS, "names a mesh topic as reply-to"),  # forging a shadow result
        ("kafka-1" + topics.SHADOW_SUFFIX, REPLIES, "a mirrored request's id"),
    ],
)
async def test_the_kafka_entry_dead_letters_tasks_that_would_answer_in_the_mesh_s_name(request_id, reply_to, reason):
    service = TokenizeService(TokenizeSettings())
    letters: list[str] = []

    @service.broker.subscriber(topics.DEAD_LETTER)
    async def collect(_body: bytes) -> None:
        letters.append(service.broker.context.get_local("message").headers[Header.DLQ_REASON])

    task = _task()
    task.request_id = request_id
    async with TestKafkaBroker(service.broker) as broker:
        await broker.publish(task.SerializeToString(), topics.GENERATE_REQUESTS, key=b"k", headers={Header.REPLY_TO: reply_to})
    assert len(letters) == 1 and reason in letters[0]


# ---- tokenize: gRPC Tokenize / CountTokens ------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (tokenize_pb2.TokenizeRequest(model="m" * 100_000, text="hi"), "model name must be"),
        (tokenize_pb2.TokenizeRequest(model="chat", text="x" * 9000), "text is 9000 characters; the limit is 8192"),
    ],
)
@pytest.mark.parametrize("method", ["Tokenize", "CountTokens"])
async def test_tokenize_rpcs_refuse_bad_requests_before_any_lookup(request_, message, method):
    service = TokenizeService(TokenizeSettings(redis_url="redis://127.0.0.1:1/0"))  # never reached
    with pytest.raises(Aborted) as refused:
        await getattr(service, method)(request_, FakeContext())
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details and len(refused.value.details) < 300


# ---- gateway: Generate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("chat@²", "model must be NAME or NAME@VERSION (VERSION a positive integer)"),  # before: UNKNOWN, Python's text
        ("chat@\u0661", "model must be NAME or NAME@VERSION (VERSION a positive integer)"),  # before: version 1
        ("chat@", "model must be NAME or NAME@VERSION (VERSION a positive integer)"),  # before: the primary
        ("chat@x", "model must be NAME or NAME@VERSION (VERSION a positive integer)"),
        ("chat@0", "model must be NAME or NAME@VERSION (VERSION a positive integer)"),
        ("m" * 100_000, "NAME is a lowercase letter"),  # before: echoed whole, past gRPC's metadata limit
    ],
)
async def test_the_gateway_refuses_bad_model_references_with_invalid_argument(model, message):
    service = GatewayService(GatewaySettings(redis_url="redis://127.0.0.1:1/0"))  # refused before Redis
    request = gateway_pb2.GenerateRequest(model=model, prompt="Return")
    with pytest.raises(Aborted) as refused:
        async for _ in service._generate(request, FakeContext(), stream=False):  # type: ignore[arg-type]
            pass
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details and len(refused.value.details) < 300


class FakeRedis:
    """What Registry.resolve reads: one live version 1 of 'chat'."""

    def register_script(self, script: str) -> Any:
        return None

    async def hget(self, key: str, field: str) -> str | None:
        live = '{"version": 1, "state": "SERVING"}'
        return live if (key, field) == ("llmesh:model:chat:versions", "1") else None

    async def hgetall(self, key: str) -> dict[str, str]:
        return {"primary": "1"} if key == "llmesh:model:chat:routing" else {}


@pytest.mark.parametrize(
    ("alias", "route"),
    [("chat", ("chat", 1)), ("chat@1", ("chat", 1)), ("chat@01", ("chat", 1)), ("chat@2", None)]
    + [(bad, None) for bad in ("chat@", "chat@²", "chat@\u0661", "chat@x", "chat@0", "chat@-1", "@1", "", "m" * 100_000)],
)
async def test_the_registry_resolves_only_well_formed_references_and_never_raises(alias, route):
    from llmesh.common.registry import Registry

    found = await Registry(FakeRedis()).resolve(alias)  # type: ignore[arg-type]
    assert (None if found is None else (found.model, found.version)) == route


# ---- any gRPC handler: an unexpected exception is INTERNAL with an error id -----------------------------


async def _serve(unary: Any, stream: Any) -> tuple[grpc.aio.Server, str]:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.aio.server(interceptors=[OutageStatus()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Test", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_an_unexpected_exception_answers_internal_with_an_error_id_not_its_text():
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ValueError("secret internals: /etc/passwd " + "x" * 100_000)

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        yield b"first"
        raise KeyError("secret internals")

    async def refused(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a handler's own refusal")
        return b""

    server, address = await _serve(unary, stream)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/test.Test/Unary")(b"")
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            details = failed.value.details() or ""
            assert "error id" in details and "secret" not in details and len(details) <= MAX_MESSAGE_CHARS
            call = channel.unary_stream("/test.Test/Stream")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                assert [item async for item in call] == [b"first"]
            assert failed.value.code() == grpc.StatusCode.INTERNAL and "secret" not in (failed.value.details() or "")
    finally:
        await server.stop(None)
    server, address = await _serve(refused, stream)  # a handler's own status passes unchanged
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/test.Test/Unary")(b"")
            assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "a handler's own refusal")
    finally:
        await server.stop(None)


# ---- infer: a deadline that passes inside Triton ---------------------------------------------------------


class DeadlineStream:
    """Triton's response stream when the call's deadline expires (tritonclient's aio iterator)."""

    def __aiter__(self) -> DeadlineStream:
        return self

    async def __anext__(self) -> Any:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded"
        )

    def cancel(self) -> bool:
        return True


async def test_triton_s_deadline_is_a_timeout_not_a_generation_error():
    generator = TritonGenerator("127.0.0.1:1")
    generator._client = SimpleNamespace(stream_infer=lambda requests, stream_timeout: DeadlineStream())  # type: ignore[assignment]
    sampling = events_pb2.ResolvedSampling(max_tokens=4, temperature=0.0, top_p=1.0)
    with pytest.raises(TimeoutError):
        async for _ in generator.generate("chat-v1", "r1", [1, 2], sampling, timeout=0.5):
            pass


def _infer_double(failure: BaseException) -> SimpleNamespace:
    """Enough of InferService for `_run`: a loaded version whose Triton stream fails with `failure`."""

    @contextmanager
    def running(loaded: Any) -> Any:
        yield

    async def get(model: str, version: int) -> Any:
        return SimpleNamespace(tokenizer=None)

    async def stream(*args: Any) -> None:
        raise failure

    async def is_live() -> bool:
        return True

    return SimpleNamespace(
        served=SimpleNamespace(get=lambda model, version: SimpleNamespace(triton_model="chat-v1"), running=running),
        supervisor=SimpleNamespace(up=True),
        catalog=SimpleNamespace(get=get),
        settings=SimpleNamespace(stream_interval_ms=0, replica="r"),
        cancels=set(),
        triton=SimpleNamespace(is_live=is_live),
        _stream=stream,
    )


class Replies:
    expired = False

    def __init__(self) -> None:
        self.chunks: list[events_pb2.TextChunk] = []

    async def send(self, chunk: events_pb2.TextChunk) -> None:
        self.chunks.append(chunk)


@pytest.mark.parametrize(
    ("deadline_s", "failure", "code"),
    [
        (0.05, TimeoutError("no final response"), grpc.StatusCode.DEADLINE_EXCEEDED),  # before: INTERNAL
        (None, TimeoutError("no final response"), grpc.StatusCode.INTERNAL),  # no deadline: the 300 s guard
    ],
)
async def test_a_deadline_passing_inside_triton_is_deadline_exceeded(deadline_s, failure, code):
    deadline = int((time.time() + deadline_s) * 1000) if deadline_s is not None else 0
    task = events_pb2.InferTask(request_id="r1", model="chat", version=1, prompt_ids=[1], deadline_unix_ms=deadline)
    reply = Replies()
    assert await InferService._run(_infer_double(failure), task, reply) == code  # type: ignore[arg-type]
    [chunk] = reply.chunks
    assert chunk.final and chunk.error.code == code.value[0]
    assert "no final response" not in chunk.error.message  # Python's text stays in the log
