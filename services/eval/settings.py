from __future__ import annotations

from llmesh.common.settings import ServiceSettings


class EvalSettings(ServiceSettings):
    grpc_port: int = 50054
    metrics_port: int = 9104
