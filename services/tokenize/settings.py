from __future__ import annotations

from llmesh.common.settings import ServiceSettings


class TokenizeSettings(ServiceSettings):
    grpc_port: int = 50052
    metrics_port: int = 9102
