"""Checks of client requests: each failure names the field and what to send instead."""

from __future__ import annotations

import math
import random

from llmesh.v1 import common_pb2, events_pb2, gateway_pb2
from services.gateway.settings import GatewaySettings


class InvalidRequest(ValueError):
    pass


def validate_prompt(request: gateway_pb2.GenerateRequest, settings: GatewaySettings) -> None:
    if not request.model:
        raise InvalidRequest("model is required: a model name such as 'chat', or a pinned version such as 'chat@2'")
    if not request.prompt.strip():
        raise InvalidRequest("prompt must not be empty")
    if len(request.prompt) > settings.max_prompt_chars:
        raise InvalidRequest(f"prompt is {len(request.prompt)} characters; the limit is {settings.max_prompt_chars}")


def resolve_sampling(params: common_pb2.SamplingParams, settings: GatewaySettings) -> events_pb2.ResolvedSampling:
    """Apply defaults to unset fields and check ranges."""
    max_tokens = params.max_tokens if params.HasField("max_tokens") else settings.default_max_tokens
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise InvalidRequest(f"sampling.max_tokens must be between 1 and {settings.max_tokens_limit}, got {max_tokens}")
    temperature = params.temperature if params.HasField("temperature") else settings.default_temperature
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise InvalidRequest(f"sampling.temperature must be between 0 (greedy) and 2, got {temperature}")
    top_p = params.top_p if params.HasField("top_p") else settings.default_top_p
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {top_p}")
    if len(params.stop) > settings.max_stop_strings:
        raise InvalidRequest(f"at most {settings.max_stop_strings} stop strings, got {len(params.stop)}")
    for stop in params.stop:
        if not stop or len(stop) > settings.max_stop_chars:
            raise InvalidRequest(f"each stop string must have 1 to {settings.max_stop_chars} characters")
    seed = params.seed if params.HasField("seed") else random.getrandbits(63)
    return events_pb2.ResolvedSampling(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(params.stop)
    )
