"""gRPC status codes carried in Kafka messages, and W3C trace context."""

from __future__ import annotations

import re
import secrets

import grpc

from llmesh.common.validation import bounded
from llmesh.v1 import common_pb2

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def error_status(code: grpc.StatusCode, message: str) -> common_pb2.ErrorStatus:
    return common_pb2.ErrorStatus(code=code.value[0], message=bounded(message))


def status_code(error: common_pb2.ErrorStatus) -> grpc.StatusCode:
    return _BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)


def traceparent(incoming: str | None) -> str:
    """The client's W3C traceparent if valid, else a new trace (so every message carries one)."""
    if incoming and _TRACEPARENT.match(incoming):
        return incoming
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
