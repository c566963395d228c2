from __future__ import annotations

import uuid

from pydantic import Field

from llmesh.common.settings import ServiceSettings
from llmesh.common.validation import RequestLimits


class GatewaySettings(ServiceSettings, RequestLimits):  # the request limits: LLMESH_MAX_TOKENS_LIMIT, ...
    grpc_port: int = 50051
    metrics_port: int = 9101
    gateway_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12], pattern=r"^[A-Za-z0-9_-]+$")
    max_waiting: int = Field(default=1024, ge=1, description="requests in flight at once; beyond: RESOURCE_EXHAUSTED")
    request_timeout_s: float = Field(default=60.0, gt=0, description="used when the client sets no deadline")
