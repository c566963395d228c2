from __future__ import annotations

from llmesh.common.settings import ServiceSettings
from llmesh.common.validation import RequestLimits


class TokenizeSettings(ServiceSettings, RequestLimits):  # the Kafka entry enforces the gateway's request limits
    grpc_port: int = 50052
    metrics_port: int = 9102
