"""Checks of what clients send, one set for every entry: the gateway's gRPC API, tokenize's Kafka
entry for text (GenerateTask) and its gRPC Tokenize/CountTokens, and any later one (an HTTP API
passes plain values to `validate_prompt`, `parse_model_ref` and `sampling_from_values`).

Every refusal is an InvalidRequest (the entry answers INVALID_ARGUMENT) whose message names the
field and what to send instead; whatever the client sent is echoed only cut (`shown`), and every
message is at most MAX_MESSAGE_CHARS. Nothing here raises anything else, whatever the input.

What is accepted (documented ranges):
  model         NAME or NAME@VERSION: NAME as a release event's model name (MODEL_NAME_PATTERN),
                VERSION ASCII digits, 1..MAX_VERSION
  prompt        1..max_prompt_chars characters, not only whitespace, valid UTF-8 text
  max_tokens    1..max_tokens_limit
  temperature   0 (greedy) or SAMPLING_EPS..2; below SAMPLING_EPS it is greedy (0.0), as in vLLM:
                dividing logits by a subnormal temperature overflows to inf/nan
  top_p         (0, 1]
  seed          0..2**64-1 (unset: random)
  stop          at most max_stop_strings strings of 1..max_stop_chars characters each
"""

from __future__ import annotations

import math
import random
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pydantic import BaseModel, Field, ValidationError, model_validator

from llmesh.v1 import common_pb2, events_pb2, gateway_pb2, tokenize_pb2

MAX_MESSAGE_CHARS = 1024  # every error message a client gets (gRPC details, a Kafka reply's error)
SHOWN_CHARS = 64  # of a client's value echoed in a message
SAMPLING_EPS = 1e-5  # temperatures below are greedy (vLLM's _SAMPLING_EPS)
MAX_TEMPERATURE = 2.0
MAX_VERSION = 2**31 - 1  # as a release event's version
MAX_SEED = 2**64 - 1
MODEL_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"  # a model's name, in release events as in requests
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN.removeprefix("^").removesuffix("$"))  # fullmatch: '$' would allow a '\n'
_DIGITS = re.compile(r"[0-9]+")
MODEL_REQUIRED = "model is required: a model name such as 'chat', or a pinned version such as 'chat@2'"
NAME_RULE = "a lowercase letter, then up to 62 lowercase letters, digits, '_' or '-'"
MODEL_REF_RULE = "model must be NAME or NAME@VERSION (VERSION a positive integer)"


class InvalidRequest(ValueError):
    """A request refused as sent (INVALID_ARGUMENT); the message says what to fix, bounded in size."""

    def __init__(self, message: str) -> None:
        super().__init__(bounded(message))


class RequestLimits(BaseModel):
    """The limits of client requests. Service settings that take requests inherit these fields
    (env LLMESH_MAX_PROMPT_CHARS, LLMESH_MAX_TOKENS_LIMIT, ...), so every entry enforces the same."""

    max_prompt_chars: int = Field(default=8192, ge=1, description="longest prompt (and text to tokenize), in characters")
    default_max_tokens: int = Field(default=32, ge=1, description="max_tokens of a request that sets none")
    max_tokens_limit: int = Field(default=512, ge=1, description="the most tokens a request may ask for")
    default_temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    default_top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_stop_strings: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _default_within_limit(self) -> RequestLimits:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} is above max_tokens_limit {self.max_tokens_limit}")
        return self


# ---- messages ------------------------------------------------------------------------------------


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as a message may echo it: its repr, cut to about `limit` characters with '…'."""
    cut = False
    if isinstance(value, str | bytes) and len(value) > limit:
        value, cut = value[:limit], True
    elif isinstance(value, int) and value.bit_length() > 8 * limit:  # repr of a huge int is slow, or refused
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # a foreign object's repr
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text, cut = text[:limit], True
    return text + "…" if cut else text


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to `limit` characters, as text any transport can carry (no lone surrogates)."""
    if len(message) > limit:
        message = message[: limit - 1] + "…"
    if not _is_utf8(message):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]
    return message


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not text protobuf (or JSON) can carry
        return False
    return True


# ---- model, version, text ------------------------------------------------------------------------


def validate_model_name(name: object) -> str:
    """A model's name as release events name it (MODEL_NAME_PATTERN)."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest(MODEL_REQUIRED)
    if not _MODEL_NAME.fullmatch(name):
        raise InvalidRequest(f"model name must be {NAME_RULE}, got {shown(name)}")
    return name


def validate_version(version: object, *, required: bool = True) -> int:
    """A version number, 1..MAX_VERSION (0 too when not `required`: the primary)."""
    lowest = 1 if required else 0
    if isinstance(version, bool) or not isinstance(version, int) or not lowest <= version <= MAX_VERSION:
        raise InvalidRequest(f"version must be a positive integer up to {MAX_VERSION}, got {shown(version)}")
    return version


def parse_model_ref(text: object) -> tuple[str, int | None]:
    """'chat' -> ('chat', None); 'chat@2' -> ('chat', 2). VERSION is ASCII digits only (str.isdigit
    takes '²', int() takes Arabic-Indic digits, ' 2' or '+2'), 1..MAX_VERSION; anything else is
    InvalidRequest, never another exception."""
    if not isinstance(text, str) or not text:
        raise InvalidRequest(MODEL_REQUIRED)
    name, at, pinned = text.partition("@")
    if not _MODEL_NAME.fullmatch(name):
        if not name:
            raise InvalidRequest(f"{MODEL_REF_RULE}, got {shown(text)}")
        raise InvalidRequest(f"{MODEL_REF_RULE}; NAME is {NAME_RULE}, got {shown(text)}")
    if not at:
        return name, None
    digits = pinned.lstrip("0")  # '' for '0', '00', ...
    if not _DIGITS.fullmatch(pinned) or not digits:
        raise InvalidRequest(f"{MODEL_REF_RULE}, got {shown(text)}")
    if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        raise InvalidRequest(f"{MODEL_REF_RULE}, got {shown(text)}: versions go up to {MAX_VERSION}")
    return name, int(digits)


def validate_text(text: object, limits: RequestLimits, field: str = "text") -> str:
    """Text of at most max_prompt_chars characters that UTF-8 can carry (may be empty)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be text, got {shown(type(text).__name__)}")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(f"{field} is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    if not _is_utf8(text):
        raise InvalidRequest(f"{field} must be valid UTF-8 text (it holds a lone surrogate)")
    return text


def validate_prompt(prompt: object, limits: RequestLimits) -> str:
    """A prompt: text of 1..max_prompt_chars characters, not only whitespace."""
    text = validate_text(prompt, limits, "prompt")
    if not text.strip():
        raise InvalidRequest("prompt must not be empty")
    return text


# ---- sampling ------------------------------------------------------------------------------------


def _real(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return None


def _float32(value: float) -> float:
    """`value` as the float32 the task carries (ResolvedSampling's fields are float)."""
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


def sampling_from_values(
    *,
    max_tokens: object,
    temperature: object,
    top_p: object,
    seed: object,
    stop: object,
    limits: RequestLimits,
) -> events_pb2.ResolvedSampling:
    """Sampling as the task carries it, from values already defaulted (seed None: a random one)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest(f"sampling.max_tokens must be between 1 and {limits.max_tokens_limit}, got {shown(max_tokens)}")
    temp = _real(temperature)
    if temp is None or not math.isfinite(temp) or not 0.0 <= temp <= MAX_TEMPERATURE:
        raise InvalidRequest(f"sampling.temperature must be between 0 (greedy) and 2, got {shown(temperature)}")
    temp = _float32(temp)
    if temp < SAMPLING_EPS:
        temp = 0.0  # greedy: a subnormal temperature makes Triton's probabilities inf/nan
    p = _real(top_p)
    if p is not None and math.isfinite(p) and 0.0 < p <= 1.0:
        p = _float32(p)  # 0 when below float32's range
    if p is None or not 0.0 < p <= 1.0:
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {shown(top_p)}")
    if seed is None:
        seed = random.getrandbits(63)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"sampling.seed must be between 0 and 2**64-1, got {shown(seed)}")
    if isinstance(stop, str | bytes) or not isinstance(stop, Sequence):
        raise InvalidRequest(f"sampling.stop must be a list of strings, got {shown(type(stop).__name__)}")
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(f"sampling.stop: at most {limits.max_stop_strings} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= limits.max_stop_chars or not _is_utf8(s):
            raise InvalidRequest(
                f"sampling.stop: each stop string must have 1 to {limits.max_stop_chars} characters of UTF-8 text, got {shown(s)}"
            )
    return events_pb2.ResolvedSampling(max_tokens=max_tokens, temperature=temp, top_p=p, seed=seed, stop=list(stop))


@dataclass(frozen=True)
class SamplingValues:
    """A client's sampling as sent, by any transport: None where unset (the defaults of RequestLimits)."""

    max_tokens: object = None
    temperature: object = None
    top_p: object = None
    seed: object = None  # None: a random seed
    stop: object = ()

    @classmethod
    def from_proto(cls, params: common_pb2.SamplingParams) -> SamplingValues:
        return cls(
            max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
            temperature=params.temperature if params.HasField("temperature") else None,
            top_p=params.top_p if params.HasField("top_p") else None,
            seed=params.seed if params.HasField("seed") else None,
            stop=list(params.stop),
        )

    def with_defaults(self, **defaults: object) -> SamplingValues:
        """These values, with `defaults` where unset (None defaults change nothing)."""
        return replace(self, **{name: value for name, value in defaults.items() if getattr(self, name) is None})

    def resolve(self, limits: RequestLimits) -> events_pb2.ResolvedSampling:
        """Checked and normalised; unset fields take the defaults of `limits`."""
        return sampling_from_values(
            max_tokens=limits.default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=limits.default_temperature if self.temperature is None else self.temperature,
            top_p=limits.default_top_p if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stop,
            limits=limits,
        )


def resolve_sampling(params: common_pb2.SamplingParams, limits: RequestLimits) -> events_pb2.ResolvedSampling:
    """A client's sampling (unset fields take the defaults of `limits`), checked and normalised."""
    return SamplingValues.from_proto(params).resolve(limits)


def check_resolved(sampling: events_pb2.ResolvedSampling, limits: RequestLimits) -> events_pb2.ResolvedSampling:
    """Sampling a Kafka client resolved itself (every field is taken as set: max_tokens 0 is refused)."""
    return sampling_from_values(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop),
        limits=limits,
    )


# ---- whole requests --------------------------------------------------------------------------------


def validate_request(request: gateway_pb2.GenerateRequest, limits: RequestLimits) -> events_pb2.ResolvedSampling:
    """A gRPC GenerateRequest: model reference, prompt, sampling; returns the resolved sampling."""
    parse_model_ref(request.model)
    validate_prompt(request.prompt, limits)
    return resolve_sampling(request.sampling, limits)


def validate_task(task: events_pb2.GenerateTask, limits: RequestLimits) -> events_pb2.ResolvedSampling:
    """A Kafka client's GenerateTask: model name, pinned version, prompt, sampling; returns the sampling normalised."""
    validate_model_name(task.model)
    validate_version(task.version)
    validate_prompt(task.prompt, limits)
    return check_resolved(task.sampling, limits)


def validate_tokenize(request: tokenize_pb2.TokenizeRequest, limits: RequestLimits) -> None:
    """A Tokenize/CountTokens request: model name, version (0: the primary), text."""
    validate_model_name(request.model)
    validate_version(request.version, required=False)
    validate_text(request.text, limits)


def summarize(err: ValidationError, limit: int = 5) -> str:
    """A pydantic error in one line a client can act on: `field: what is wrong; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:limit])
