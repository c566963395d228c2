from __future__ import annotations

import uuid

from pydantic import Field

from llmesh.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    grpc_port: int = 50051
    metrics_port: int = 9101
    gateway_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12], pattern=r"^[A-Za-z0-9_-]+$")
    max_prompt_chars: int = Field(default=8192, ge=1)
    default_max_tokens: int = Field(default=32, ge=1)
    max_tokens_limit: int = Field(default=512, ge=1)
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    max_stop_strings: int = 4
    max_stop_chars: int = 64
    api_keys_required: bool = Field(default=False, description="refuse calls without a live API key (llmesh keys)")
    max_waiting: int = Field(default=1024, ge=1, description="requests in flight at once; beyond: RESOURCE_EXHAUSTED")
    request_timeout_s: float = Field(default=60.0, gt=0, description="used when the client sets no deadline")
