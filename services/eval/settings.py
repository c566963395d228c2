from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llmesh.common.settings import ServiceSettings


class EvalSettings(ServiceSettings):
    grpc_port: int = 50054
    metrics_port: int = 9104
    policy_file: Path | None = Field(default=None, description="YAML promotion policy (defaults if unset)")
    policy_interval_s: float = Field(default=1.0, gt=0)
    join_ttl_s: float = Field(default=30.0, gt=0, description="how long one side of a pair waits for the other")
    preload_embedder: bool = Field(
        default=False,
        description="load the embedding model at start (about 360 MB more at idle) instead of on the first scored pair",
    )
    sensitive_words: list[str] = Field(default_factory=lambda: ["password", "secret", "token", "ssn"])
