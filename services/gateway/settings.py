from __future__ import annotations

import uuid
from pathlib import Path

from pydantic import Field

from llmesh.common.settings import ServiceSettings
from llmesh.common.validation import RequestLimits


class GatewaySettings(ServiceSettings, RequestLimits):  # the request limits: LLMESH_MAX_TOKENS_LIMIT, ...
    grpc_port: int = 50051
    metrics_port: int = 9101
    gateway_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12], pattern=r"^[A-Za-z0-9_-]+$")
    max_waiting: int = Field(default=1024, ge=1, description="requests in flight at once; beyond: RESOURCE_EXHAUSTED")
    http_host: str = Field(default="127.0.0.1", description="the OpenAI-compatible HTTP API's address")
    http_port: int = Field(default=8080, ge=0, le=65535, description="the OpenAI-compatible HTTP API's port (0: any free)")
    http_max_body_bytes: int = Field(default=1 << 20, ge=1024, description="the largest HTTP request body; beyond: 413")
    request_timeout_s: float = Field(default=60.0, gt=0, description="used when the client sets no deadline")
    content_rules_file: Path | None = Field(
        default=None,
        description="YAML word lists and patterns checked on every prompt and answer (count, redact, refuse); "
        "read again when it changes",
    )
    record_texts: bool = Field(
        default=False,
        description="keep each request's prompt and answer in its generation record (eval keeps them for the fine-tuning "
        "export); off by default: privacy",
    )
    feedback_window_s: float = Field(default=7 * 24 * 3600, gt=0, description="how long an answer may be rated")
