"""The gateway's OpenAI-compatible HTTP API (services/gateway/http_api.py), in process, over a fake
data plane that yields scripted chunks or raises scripted GenerationErrors and records what it was
asked and how its generator ended: error statuses, request mapping, refusals, body checks, answer
and Server-Sent Event shapes, keys, /v1/models, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
import httpx2
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.types import ASGIApp, Message

from llmesh.common.apikeys import ApiKey, Scope
from llmesh.common.chat import ChatMessage
from llmesh.common.keycheck import KeyRing
from llmesh.common.registry import Route
from llmesh.common.validation import SamplingValues
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2
from services.gateway.dataplane import DataPlane, GenerationError, GenerationRequest, Outcome
from services.gateway.http_api import BodyLimit, ClientGone, HttpApi, until_disconnect
from services.gateway.settings import GatewaySettings

MODEL, VERSION, REQUEST_ID = "chat", 2, "req0001"
LIMIT = 4096  # bytes of request body
SETTINGS = GatewaySettings(http_max_body_bytes=LIMIT)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HOLD = "hold"  # a script step: the generator waits here until cancelled or closed

Step = events_pb2.TextChunk | Exception | str
Chunks = AsyncGenerator[tuple[Outcome, events_pb2.TextChunk], None]


def chunk(
    text: str, final: bool = False, reason: int = common_pb2.FINISH_REASON_UNSPECIFIED, usage: tuple[int, int] = (0, 0)
) -> events_pb2.TextChunk:
    counted = common_pb2.Usage(prompt_tokens=usage[0], completion_tokens=usage[1])
    return events_pb2.TextChunk(text=text, final=final, finish_reason=reason, usage=counted if final else None)  # type: ignore[arg-type]


ANSWER = [chunk("Hel"), chunk("lo"), chunk("!", final=True, reason=common_pb2.FINISH_REASON_STOP, usage=(5, 3))]


def version(number: int, state: int) -> gateway_pb2.ModelVersionInfo:
    return gateway_pb2.ModelVersionInfo(version=number, state=state, updated_at=1000.0 + number)  # type: ignore[arg-type]


MODELS = [
    gateway_pb2.ModelInfo(
        name="chat",
        primary_version=2,
        versions=[
            version(1, common_pb2.VERSION_STATE_RETIRED),
            version(2, common_pb2.VERSION_STATE_SERVING),
            version(3, common_pb2.VERSION_STATE_READY),
            version(4, common_pb2.VERSION_STATE_FAILED),
            version(5, common_pb2.VERSION_STATE_STAGED),
        ],
    ),
    gateway_pb2.ModelInfo(name="base", primary_version=1, versions=[version(1, common_pb2.VERSION_STATE_SERVING)]),
]


class FakePlane:
    """DataPlane's generate/models/model over a script; records each request and how its generator ended."""

    def __init__(self, script: list[Step] | None = None) -> None:
        self.script = list(ANSWER if script is None else script)
        self.requests: list[GenerationRequest] = []
        self.ended = ""  # "completed", "cancelled" (CancelledError), "closed" (GeneratorExit) or "raised"
        self.holding = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> Chunks:
        self.requests.append(request)
        outcome = Outcome(Route(MODEL, VERSION), REQUEST_ID, request.stream)
        ended = "raised"
        try:
            for step in self.script:
                if isinstance(step, Exception):
                    raise step
                if isinstance(step, str):
                    self.holding.set()
                    await asyncio.Event().wait()
                else:
                    yield outcome, step
            ended = "completed"
        except asyncio.CancelledError:
            ended = "cancelled"
            raise
        except GeneratorExit:
            ended = "closed"
            raise
        finally:
            self.ended = ended

    async def models(self) -> list[gateway_pb2.ModelInfo]:
        return MODELS

    async def model(self, name: str, with_history: bool = False) -> gateway_pb2.ModelInfo:
        if info := next((info for info in MODELS if info.name == name), None):
            return info
        raise GenerationError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not registered")

    @property
    def request(self) -> GenerationRequest:
        assert len(self.requests) == 1, self.requests
        return self.requests[0]


def api_key(name: str, scopes: list[Scope]) -> ApiKey:
    return ApiKey(id=f"id-{name}", name=name, scopes=scopes, digest="-", created_at=time.time())


KEYS = {"sk-gen": api_key("gen", [Scope.GENERATE]), "sk-read": api_key("read", [Scope.READ])}


class FakeKeys:
    async def find(self, secret: str) -> ApiKey | None:
        return KEYS.get(secret)


def make_app(plane: FakePlane, keys: KeyRing | None = None) -> ASGIApp:
    """The app as HttpApi.start serves it: behind BodyLimit."""
    return BodyLimit(HttpApi(cast(DataPlane, plane), SETTINGS, keys).app, SETTINGS.http_max_body_bytes)


async def call(
    plane: FakePlane,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    keys: KeyRing | None = None,
    method: str = "POST",
    content: bytes | AsyncIterator[bytes] | None = None,
) -> httpx2.Response:
    transport = httpx2.ASGITransport(app=make_app(plane, keys))
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
        if content is not None:
            headers = {"content-type": "application/json"} | (headers or {})
            return await client.request(method, path, content=content, headers=headers)
        return await client.request(method, path, json=body, headers=headers)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | extra


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "once upon"} | extra


def error_of(response: httpx2.Response) -> dict[str, Any]:
    """The OpenAI error object, checked for its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["param"] is None
    return cast(dict[str, Any], error)


def events_of(response: httpx2.Response) -> list[str]:
    """The data of each Server-Sent Event, checking every event is `data: ...` and ends with a blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n"), text
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event.removeprefix("data: ") for event in events]


def json_events(response: httpx2.Response) -> list[dict[str, Any]]:
    data = events_of(response)
    assert data[-1] == "[DONE]", data
    return [json.loads(item) for item in data[:-1]]


# ---- 1. errors before the first chunk ----------------------------------------------------------------

ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    (grpc.StatusCode.INTERNAL, 500, "internal_error"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("code", "status", "kind"), ERRORS, ids=[code.name for code, _, _ in ERRORS])
async def test_an_error_before_the_first_chunk_has_its_status_and_openai_shape(
    code: grpc.StatusCode, status: int, kind: str, stream: bool
) -> None:
    plane = FakePlane([GenerationError(code, "it went wrong")])
    response = await call(plane, CHAT, chat_body(stream=stream))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert error_of(response) == {"message": "it went wrong", "type": kind, "param": None, "code": code.name.lower()}
    assert "retry-after" not in response.headers and "retry-after-ms" not in response.headers
    assert plane.ended == "raised"


@pytest.mark.parametrize(("seconds", "whole", "ms"), [(1.2, "2", "1200"), (3.0, "3", "3000"), (0.0004, "1", "1")])
async def test_rate_limited_answers_say_when_to_retry(seconds: float, whole: str, ms: str) -> None:
    plane = FakePlane([GenerationError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_after_s=seconds)])
    response = await call(plane, COMPLETIONS, completion_body())
    assert response.status_code == 429
    assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == (whole, ms)
    assert error_of(response)["type"] == "rate_limit_error"


async def test_sampling_field_names_are_flat_in_http_errors() -> None:
    plane = FakePlane([GenerationError(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: must be at most 64")])
    response = await call(plane, CHAT, chat_body(max_tokens=100))
    assert response.status_code == 400
    assert error_of(response)["message"] == "max_tokens: must be at most 64"


# ---- 2. requests as the data plane gets them ---------------------------------------------------------


async def test_a_chat_request_becomes_a_generation_request() -> None:
    plane = FakePlane()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    body = chat_body(
        messages=messages,
        max_tokens=50,
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop="END",
        user="someone",
    )
    headers = {
        "authorization": "Bearer sk-abc",
        "x-stainless-timeout": "12.5",
        "x-scenario": "smoke",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    response = await call(plane, CHAT, body, headers)
    assert response.status_code == 200, response.text
    assert plane.request == GenerationRequest(
        model=MODEL,
        prompt=[ChatMessage(role="system", content="be brief"), ChatMessage.model_validate(messages[1])],
        sampling=SamplingValues(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["END"]),
        stream=False,
        caller=None,
        client_key="sk-abc",
        traceparent=headers["traceparent"],
        scenario="smoke",
        timeout_s=12.5,
    )


async def test_a_completions_request_becomes_a_generation_request() -> None:
    plane = FakePlane()
    body = completion_body(prompt=["once upon"], max_tokens=9, stop=["a", "b"], stream=True, user="someone")
    response = await call(plane, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    assert plane.request == GenerationRequest(
        model=MODEL,
        prompt="once upon",
        sampling=SamplingValues(max_tokens=9, stop=["a", "b"]),
        stream=True,
        client_key="someone",
    )


async def test_chat_takes_max_tokens_without_max_completion_tokens() -> None:
    plane = FakePlane()
    assert (await call(plane, CHAT, chat_body(max_tokens=11))).status_code == 200
    assert plane.request.sampling == SamplingValues(max_tokens=11, stop=[])
    assert plane.request.client_key == "" and plane.request.timeout_s is None and plane.request.scenario == ""


@pytest.mark.parametrize("header", ["soon", "0", "-3", "inf", "nan", ""])
async def test_a_timeout_header_that_is_not_a_positive_number_is_ignored(header: str) -> None:
    plane = FakePlane()
    assert (await call(plane, CHAT, chat_body(), {"x-stainless-timeout": header})).status_code == 200
    assert plane.request.timeout_s is None


# ---- 3. fields llmesh does not implement ------------------------------------------------------------

REFUSED = [
    (CHAT, chat_body(n=2), "n"),
    (CHAT, chat_body(presence_penalty=0.5), "presence_penalty"),
    (CHAT, chat_body(frequency_penalty=-1), "frequency_penalty"),
    (CHAT, chat_body(logit_bias={"50256": -100}), "logit_bias"),
    (CHAT, chat_body(logprobs=True), "logprobs"),
    (CHAT, chat_body(top_logprobs=2), "logprobs"),
    (CHAT, chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (CHAT, chat_body(tool_choice="auto"), "tools"),
    (CHAT, chat_body(response_format={"type": "json_object"}), "response_format"),
    (COMPLETIONS, completion_body(echo=True), "echo"),
    (COMPLETIONS, completion_body(suffix="end"), "suffix"),
    (COMPLETIONS, completion_body(logprobs=0), "logprobs"),
    (COMPLETIONS, completion_body(best_of=2), "best_of"),
    (COMPLETIONS, completion_body(n=3), "n"),
    (COMPLETIONS, completion_body(prompt=[1, 2, 3]), "prompt"),
    (COMPLETIONS, completion_body(prompt=[[1, 2], [3]]), "prompt"),
    (COMPLETIONS, completion_body(prompt=["one", "two"]), "prompt"),
]


@pytest.mark.parametrize(("path", "body", "field"), REFUSED, ids=[f"{p.rsplit('/', 1)[1]}-{f}" for p, _, f in REFUSED])
async def test_unimplemented_fields_are_refused_by_name(path: str, body: dict[str, Any], field: str) -> None:
    plane = FakePlane()
    response = await call(plane, path, body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert field in error["message"].replace(",", " ").split(), error["message"]
    assert plane.requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, chat_body(n=1, presence_penalty=0, logprobs=False, tool_choice="none", response_format={"type": "text"})),
        (CHAT, chat_body(unknown_field=1, metadata={"a": "b"}, store=False)),
        (COMPLETIONS, completion_body(best_of=1, echo=False, whatever=[1, 2])),
    ],
)
async def test_neutral_values_and_unknown_fields_are_accepted(path: str, body: dict[str, Any]) -> None:
    plane = FakePlane()
    response = await call(plane, path, body)
    assert response.status_code == 200, response.text
    assert plane.ended == "completed"


# ---- 4. bodies that are not requests -----------------------------------------------------------------


async def test_malformed_json_is_a_clean_400() -> None:
    response = await call(FakePlane(), CHAT, content=b'{"model": "chat", "messages": [')
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
    assert "Traceback" not in error["message"] and "Error(" not in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (chat_body(max_tokens="4"), "max_tokens"),
        (completion_body(max_tokens="4"), "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"prompt": "hi"}, "model"),
        (chat_body(stream="yes"), "stream"),
        (chat_body(messages=[{"role": "wizard", "content": "hi"}]), "role"),
    ],
)
async def test_a_body_of_the_wrong_shape_is_400_naming_the_field(body: dict[str, Any], field: str) -> None:
    path = CHAT if "messages" in body else COMPLETIONS
    plane = FakePlane()
    response = await call(plane, path, body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and field in error["message"], error
    assert plane.requests == []


async def test_an_image_part_is_refused() -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    plane = FakePlane()
    response = await call(plane, CHAT, chat_body(messages=[{"role": "user", "content": parts}]))
    assert response.status_code == 400
    assert "image_url" in error_of(response)["message"]
    assert plane.requests == []


def oversized() -> bytes:
    return json.dumps(completion_body(prompt="x" * LIMIT)).encode()


async def test_a_body_over_the_limit_is_413_by_its_length() -> None:
    plane = FakePlane()
    response = await call(plane, COMPLETIONS, content=oversized())
    assert response.status_code == 413
    assert error_of(response)["type"] == "invalid_request_error"
    assert plane.requests == []


async def test_a_chunked_body_over_the_limit_is_413() -> None:
    async def parts() -> AsyncIterator[bytes]:
        body = oversized()
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    plane = FakePlane()
    response = await call(plane, COMPLETIONS, content=parts())
    assert response.status_code == 413, response.text
    assert str(LIMIT) in error_of(response)["message"]
    assert plane.requests == []


async def test_a_chunked_body_under_the_limit_is_served() -> None:
    async def parts() -> AsyncIterator[bytes]:
        body = json.dumps(completion_body(prompt="x" * 1500)).encode()
        yield body[:1000]
        yield body[1000:]

    plane = FakePlane()
    response = await call(plane, COMPLETIONS, content=parts())
    assert response.status_code == 200, response.text
    assert plane.request.prompt == "x" * 1500


async def test_a_content_length_that_is_not_a_number_is_refused() -> None:
    scope = asgi_scope(CHAT, b"{}", [(b"content-length", b"12abc")])
    client = AsgiClient(b"{}")
    await make_app(FakePlane())(scope, client.receive, client.send)
    assert client.status == 413


# ---- 5. whole answers --------------------------------------------------------------------------------

FINISHES = [
    (common_pb2.FINISH_REASON_LENGTH, "length"),
    (common_pb2.FINISH_REASON_EOS, "stop"),
    (common_pb2.FINISH_REASON_STOP, "stop"),
]


@pytest.mark.parametrize(("reason", "finish"), FINISHES)
async def test_a_chat_answer(reason: int, finish: str) -> None:
    script: list[Step] = [chunk("Hel"), chunk("lo"), chunk(" you", final=True, reason=reason, usage=(5, 3))]
    plane = FakePlane(script)
    response = await call(plane, CHAT, chat_body())
    assert response.status_code == 200
    assert response.headers["x-request-id"] == REQUEST_ID
    assert response.headers["llmesh-version"] == f"{MODEL}@{VERSION}"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == f"chatcmpl-{REQUEST_ID}" and body["model"] == MODEL
    assert body["system_fingerprint"] == f"{MODEL}@{VERSION}"
    assert abs(body["created"] - time.time()) < 60
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == finish
    assert choice["message"] == {"role": "assistant", "content": "Hello you"}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert plane.ended == "completed"


async def test_a_completions_answer() -> None:
    plane = FakePlane([chunk("one "), chunk("two", final=True, reason=common_pb2.FINISH_REASON_LENGTH, usage=(2, 7))])
    response = await call(plane, COMPLETIONS, completion_body())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["id"] == f"cmpl-{REQUEST_ID}"
    assert body["choices"][0]["text"] == "one two" and "message" not in body["choices"][0]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 9


# ---- 6. Server-Sent Events -----------------------------------------------------------------------


async def test_a_chat_stream() -> None:
    plane = FakePlane()
    response = await call(plane, CHAT, chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-request-id"] == REQUEST_ID
    chunks = json_events(response)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert all(c["id"] == f"chatcmpl-{REQUEST_ID}" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "Hel"},
        {"content": "lo"},
        {"content": "!"},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert plane.ended == "completed"


async def test_a_completions_stream() -> None:
    response = await call(FakePlane(), COMPLETIONS, completion_body(stream=True))
    chunks = json_events(response)
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("path", "body"), [(CHAT, chat_body()), (COMPLETIONS, completion_body())])
async def test_a_stream_with_usage_ends_with_a_usage_chunk(path: str, body: dict[str, Any]) -> None:
    response = await call(FakePlane(), path, body | {"stream": True, "stream_options": {"include_usage": True}})
    chunks = json_events(response)
    assert len(chunks) == 4
    assert all("usage" in c and c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


async def test_an_error_after_the_first_chunk_ends_the_stream_with_an_error_event() -> None:
    plane = FakePlane([chunk("Hel"), GenerationError(grpc.StatusCode.UNAVAILABLE, "the replica went away")])
    response = await call(plane, CHAT, chat_body(stream=True))
    assert response.status_code == 200
    data = events_of(response)
    assert "[DONE]" not in data and len(data) == 2
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "Hel"
    assert json.loads(data[1]) == {
        "error": {"message": "the replica went away", "type": "service_unavailable", "param": None, "code": "unavailable"}
    }
    assert plane.ended == "raised"


async def test_an_outage_after_the_first_chunk_ends_the_stream_with_an_error_event_too() -> None:
    plane = FakePlane([chunk("Hel"), RedisConnectionError("connection refused")])
    data = events_of(await call(plane, COMPLETIONS, completion_body(stream=True)))
    assert "[DONE]" not in data and len(data) == 2
    error = json.loads(data[1])["error"]
    assert error["code"] == "unavailable" and "Redis" in error["message"] and "refused" not in error["message"]


async def test_unknown_paths_answer_in_openais_error_shape() -> None:
    response = await call(FakePlane(), "/v1/embeddings", {"model": "chat", "input": "x"})
    assert response.status_code == 404 and error_of(response)["type"] == "not_found_error"


async def test_max_completion_tokens_zero_is_refused_not_replaced() -> None:
    plane = FakePlane()
    await call(plane, CHAT, chat_body(max_tokens=8, max_completion_tokens=0))
    assert plane.request.sampling.max_tokens == 0  # the data plane refuses it (1..limit), as gRPC's


# ---- 7. keys -------------------------------------------------------------------------------------

KEYRING = KeyRing(FakeKeys())


async def test_without_a_key_a_bad_body_is_401_not_400() -> None:
    response = await call(FakePlane(), CHAT, {"model": 5}, keys=KEYRING)
    assert response.status_code == 401


async def test_no_key_is_401_naming_the_bearer_header() -> None:
    plane = FakePlane()
    response = await call(plane, CHAT, chat_body(), keys=KEYRING)
    assert response.status_code == 401
    error = error_of(response)
    assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
    assert plane.requests == []


@pytest.mark.parametrize(
    ("secret", "status", "kind"),
    [("sk-unknown", 401, "authentication_error"), ("sk-read", 403, "permission_error")],
)
async def test_a_key_that_cannot_generate_is_refused(secret: str, status: int, kind: str) -> None:
    plane = FakePlane()
    for path, body in ((CHAT, chat_body()), (COMPLETIONS, completion_body())):
        response = await call(plane, path, body, {"authorization": f"Bearer {secret}"}, keys=KEYRING)
        assert response.status_code == status
        assert error_of(response)["type"] == kind
    assert plane.requests == []


@pytest.mark.parametrize("header", [{"authorization": "Bearer sk-gen"}, {"x-api-key": "sk-gen"}])
async def test_a_generate_key_is_the_caller(header: dict[str, str]) -> None:
    plane = FakePlane()
    response = await call(plane, CHAT, chat_body(user="someone"), header, keys=KEYRING)
    assert response.status_code == 200, response.text
    assert plane.request.caller == KEYS["sk-gen"]
    assert plane.request.client_key == "sk-gen"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/chat"])
async def test_models_need_a_key(path: str) -> None:
    assert (await call(FakePlane(), path, method="GET", keys=KEYRING)).status_code == 401
    headers = {"authorization": "Bearer sk-gen"}
    assert (await call(FakePlane(), path, method="GET", headers=headers, keys=KEYRING)).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_need_no_key(path: str) -> None:
    response = await call(FakePlane(), path, method="GET", keys=KEYRING)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# ---- 8. /v1/models -------------------------------------------------------------------------------


async def test_models_lists_each_model_and_its_routable_versions() -> None:
    response = await call(FakePlane(), "/v1/models", method="GET")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [entry["id"] for entry in body["data"]] == ["chat", "chat@2", "chat@3", "base", "base@1"]
    assert all(entry["object"] == "model" and entry["owned_by"] == "llmesh" for entry in body["data"])
    assert body["data"][1]["created"] == 1002


@pytest.mark.parametrize("model_id", ["chat", "chat@2", "chat@3", "base@1"])
async def test_a_served_model_is_found(model_id: str) -> None:
    response = await call(FakePlane(), f"/v1/models/{model_id}", method="GET")
    assert response.status_code == 200
    assert response.json()["id"] == model_id


@pytest.mark.parametrize("model_id", ["chat@9", "chat@1", "chat@4", "chat@5", "nope", "nope@1"])
async def test_a_model_not_served_is_404(model_id: str) -> None:
    response = await call(FakePlane(), f"/v1/models/{model_id}", method="GET")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"


# ---- 9. clients that go away -------------------------------------------------------------------------


def asgi_scope(path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    default = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers if headers is not None else default,
        "server": ("test", 80),
        "client": ("127.0.0.1", 5000),
    }


class AsgiClient:
    """An ASGI server's side of one request: the body, then `http.disconnect` once `leave()` is called."""

    def __init__(self, body: bytes, stall_after: int = 0) -> None:
        self.body, self.body_read = body, False
        self.gone = asyncio.Event()
        self.sent: list[Message] = []
        self.stall_after = stall_after  # when set, sending this many body events blocks (a slow client)
        self.stalled = asyncio.Event()

    async def receive(self) -> Message:
        if not self.body_read:
            self.body_read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if self.stall_after and len(self.events) >= self.stall_after:
            self.stalled.set()
            await asyncio.Event().wait()

    def leave(self) -> None:
        self.gone.set()

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def events(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m.get("body")]

    @property
    def finished(self) -> bool:
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent)


async def serve(
    plane: FakePlane, path: str, body: dict[str, Any], leave_when: Callable[[AsgiClient], Awaitable[object]], **kw: Any
) -> AsgiClient:
    """One request straight into the app; the client leaves once `leave_when` returns."""
    raw = json.dumps(body).encode()
    client = AsgiClient(raw, **kw)
    app = make_app(plane)

    async def run() -> None:
        await app(asgi_scope(path, raw), client.receive, client.send)

    served = asyncio.create_task(run())
    await asyncio.wait_for(leave_when(client), 2)
    client.leave()
    await asyncio.wait_for(served, 2)
    return client


@pytest.mark.parametrize("stream", [False, True])
async def test_leaving_before_the_first_chunk_cancels_the_generation(stream: bool) -> None:
    plane = FakePlane([HOLD])
    client = await serve(plane, CHAT, chat_body(stream=stream), lambda _: plane.holding.wait())
    assert plane.ended == "cancelled"
    assert client.status == 499 and client.events == []


async def test_leaving_a_unary_answer_midway_cancels_the_generation() -> None:
    plane = FakePlane([chunk("Hel"), HOLD])
    client = await serve(plane, COMPLETIONS, completion_body(), lambda _: plane.holding.wait())
    assert plane.ended == "cancelled"
    assert client.status == 499


async def test_leaving_a_stream_midway_cancels_the_generation() -> None:
    plane = FakePlane([chunk("Hel"), chunk("lo"), HOLD])
    client = await serve(plane, CHAT, chat_body(stream=True), lambda _: plane.holding.wait())
    assert plane.ended in ("cancelled", "closed")
    assert client.status == 200 and len(client.events) == 2
    assert not client.finished and b"[DONE]" not in b"".join(client.events)


async def test_leaving_a_stream_while_its_events_wait_to_be_sent_closes_the_generation() -> None:
    plane = FakePlane([chunk("a"), chunk("b"), chunk("c"), HOLD])
    client = await serve(plane, CHAT, chat_body(stream=True), lambda c: c.stalled.wait(), stall_after=2)
    assert plane.ended == "closed"  # suspended at a chunk, not running: closed, not cancelled
    assert not plane.holding.is_set() and len(client.events) == 2


@pytest.mark.parametrize(("path", "body"), [(CHAT, chat_body()), (COMPLETIONS, completion_body(stream=True))])
async def test_an_answer_that_completes_is_not_cancelled(path: str, body: dict[str, Any]) -> None:
    plane = FakePlane()
    raw = json.dumps(body).encode()
    client = AsgiClient(raw)
    await asyncio.wait_for(make_app(plane)(asgi_scope(path, raw), client.receive, client.send), 2)
    client.leave()  # the server sees the connection close only after the answer
    assert client.status == 200 and client.finished
    assert plane.ended == "completed"


# ---- 10. until_disconnect ------------------------------------------------------------------------------


def receiving(*messages: Message) -> Callable[[], Awaitable[Message]]:
    """A receive that gives `messages`, then waits forever."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


class Work:
    """A coroutine to race against the client, recording whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False
        self.release = asyncio.Event()

    async def run(self, result: object = "done", error: Exception | None = None) -> object:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if error is not None:
            raise error
        return result


async def test_until_disconnect_returns_the_result_of_the_work() -> None:
    work = Work()
    work.release.set()
    assert await until_disconnect(receiving({"type": "http.request", "body": b""}), work.run(42)) == 42
    assert not work.cancelled


async def test_until_disconnect_cancels_the_work_when_the_client_leaves() -> None:
    work = Work()
    messages = ({"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        await asyncio.wait_for(until_disconnect(receiving(*messages), work.run()), 2)
    assert work.cancelled


async def test_until_disconnect_passes_the_work_error_on() -> None:
    work = Work()
    work.release.set()
    with pytest.raises(GenerationError) as raised:
        await until_disconnect(receiving(), work.run(error=GenerationError(grpc.StatusCode.INTERNAL, "boom")))
    assert raised.value.code == grpc.StatusCode.INTERNAL and not work.cancelled


async def test_until_disconnect_lets_an_outer_cancel_through() -> None:
    work = Work()
    racing = asyncio.create_task(until_disconnect(receiving(), work.run()))
    await asyncio.sleep(0)
    racing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await racing
    assert work.cancelled


async def test_the_listening_socket_sends_small_writes_at_once() -> None:
    """Accepted connections inherit TCP_NODELAY: without it, the body written after the headers
    waited for the client's delayed ACK (40 ms a response, measured)."""
    api = HttpApi(cast(DataPlane, FakePlane()), GatewaySettings(http_port=0), None)
    await api.start()
    try:
        assert api.server is not None
        (listening,) = [sock for server in api.server.servers for sock in server.sockets]
        assert listening.proto == socket.IPPROTO_TCP
        assert listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as client:
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await api.stop(1)
