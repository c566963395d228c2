"""The OpenAI HTTP API as llmesh speaks it: request bodies (pydantic, checked at the edge) and the
JSON of answers, chunks and errors. Fields llmesh does not implement are refused by name rather than
ignored, so a client never gets an answer to a question it did not ask."""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from llmesh.common.chat import ChatMessage
from llmesh.common.validation import SamplingValues
from llmesh.v1 import common_pb2, events_pb2

Number = StrictFloat | StrictInt

FINISH_REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_EOS: "stop",
}
ROUTABLE = (common_pb2.VERSION_STATE_READY, common_pb2.VERSION_STATE_SERVING)  # what /v1/models lists as NAME@N
# canonical status -> (HTTP status, OpenAI error type)
ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def error_body(code: grpc.StatusCode, message: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error JSON of a canonical status."""
    http_status, kind = ERRORS.get(code, (500, "internal_error"))
    return http_status, {"error": {"message": message, "type": kind, "param": None, "code": code.name.lower()}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class OpenAIRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    scenario: StrictStr | None = None  # llmesh: a released scenario (model may be ""), or a label
    variables: dict[str, StrictStr | StrictBool | StrictInt | float] | None = None  # llmesh: its template's

    def unsupported(self) -> str:
        """Why llmesh cannot answer this request as asked ('' when it can)."""
        if self.n not in (None, 1):
            return "n must be 1: llmesh answers with one choice per request"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported (omit them or send 0)"
        if self.logit_bias:
            return "logit_bias is not supported"
        return ""

    def sampling(self, max_tokens: int | None) -> SamplingValues:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingValues(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = ""  # "": a scenario renders it
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = None

    def unsupported(self) -> str:
        if not isinstance(self.prompt, str) and not (len(self.prompt) == 1 and isinstance(self.prompt[0], str)):
            return "prompt must be one text: lists of prompts and token ids are not supported"
        if self.echo or self.suffix or self.logprobs is not None:
            return "echo, suffix and logprobs are not supported"
        if self.best_of not in (None, 1):
            return "best_of must be 1"
        return super().unsupported()

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else str(self.prompt[0])


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str:
        if self.logprobs or self.top_logprobs:
            return "logprobs are not supported"
        if self.tools or self.tool_choice not in (None, "none"):
            return "tools are not supported"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format must be text (JSON modes are not supported)"
        return super().unsupported()


class Api(Enum):
    """The two generation endpoints: the same answer in two shapes."""

    CHAT = ("chatcmpl-", "chat.completion", "chat.completion.chunk")
    COMPLETIONS = ("cmpl-", "text_completion", "text_completion")

    def __init__(self, id_prefix: str, whole: str, chunk: str) -> None:
        self.id_prefix, self.whole, self.chunk = id_prefix, whole, chunk

    def answer(self, head: AnswerHead, text: str, final: events_pb2.TextChunk) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASONS.get(final.finish_reason, "stop")}
        if self is Api.CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return head.body(self, self.whole, [choice]) | {"usage": usage(final.usage)}

    def delta(self, head: AnswerHead, chunk: events_pb2.TextChunk, first: bool, with_usage: bool) -> dict[str, Any]:
        finish = FINISH_REASONS.get(chunk.finish_reason, "stop") if chunk.final else None
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self is Api.CHAT:
            choice["delta"] = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        else:
            choice["text"] = chunk.text
        body = head.body(self, self.chunk, [choice])
        return body | {"usage": None} if with_usage else body

    def usage_chunk(self, head: AnswerHead, final: events_pb2.TextChunk) -> dict[str, Any]:
        return head.body(self, self.chunk, []) | {"usage": usage(final.usage)}


class AnswerHead:
    """The fields every answer and chunk of one request repeats."""

    def __init__(self, request_id: str, model: str, version: int) -> None:
        self.request_id, self.model, self.created = request_id, model, int(time.time())
        self.fingerprint = f"{model}@{version}"  # the version that answered

    def body(self, api: Api, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": api.id_prefix + self.request_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }


def usage(counted: common_pb2.Usage) -> dict[str, int]:
    total = counted.prompt_tokens + counted.completion_tokens
    return {"prompt_tokens": counted.prompt_tokens, "completion_tokens": counted.completion_tokens, "total_tokens": total}


def model_entries(infos: list[Any]) -> list[dict[str, Any]]:
    """/v1/models: each model under its name (its primary) and each routable version as NAME@N."""
    entries = []
    for info in infos:
        routable = [v for v in info.versions if v.state in ROUTABLE]
        created = int(min((v.updated_at for v in routable), default=0))
        entries.append(model_entry(info.name, created))
        entries += [model_entry(f"{info.name}@{v.version}", int(v.updated_at)) for v in routable]
    return entries


def model_entry(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llmesh"}
