from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field

from llmesh.common.settings import ServiceSettings


class InferSettings(ServiceSettings):
    grpc_port: int = 50053
    metrics_port: int = 9103
    triton_url: str = "127.0.0.1:18001"
    model_repository: Path = Path(".llmesh/triton-models")
    replica: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    instance_kind: str = Field(default="auto", pattern="^(auto|KIND_CPU|KIND_GPU)$")
    instances: int = Field(default=1, ge=1)
    torch_threads: int = Field(default=0, ge=0, description="0 = let torch decide")
    load_timeout_s: float = 120.0
    warmup_tokens: int = 2
