"""Settings shared by every service; each service extends `ServiceSettings` with its own fields.

Values come from the command line (`--grpc-port 50051`), then `LLMESH_*` environment variables
(`LLMESH_KAFKA__BOOTSTRAP=...`), then defaults.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import grpc
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    bootstrap: str = "127.0.0.1:19092"
    # The embedded broker answers a waiting fetch only when this wait expires: it bounds latency per hop.
    fetch_max_wait_ms: int = Field(default=5, ge=1, le=1000)
    # Request-path consumers poll this slowly after idle_after_s without requests (llmesh/common/polling.py).
    idle_fetch_max_wait_ms: int = Field(default=25, ge=1, le=1000)
    idle_after_s: float = Field(default=2.0, gt=0)
    # Consumers off the request path (releases, status, eval's inputs) always poll slowly.
    control_fetch_max_wait_ms: int = Field(default=250, ge=1, le=1000)
    session_timeout_ms: int = Field(default=3000, ge=500)
    heartbeat_interval_ms: int = Field(default=500, ge=100)
    request_timeout_ms: int = 5000


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMESH_", env_nested_delimiter="__", cli_kebab_case=True, cli_implicit_flags=True, extra="ignore"
    )

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    kafka: KafkaSettings = KafkaSettings()
    redis_url: str = "redis://127.0.0.1:16379/0"
    replica: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", description="this process's name")
    release_hmac_key: SecretStr | None = Field(default=None, description="when set, release events must carry its HMAC-SHA256")
    log_level: str = "INFO"
    drain_seconds: float = Field(default=30.0, ge=0, description="how long SIGTERM waits for in-flight work")
    max_in_flight: int = Field(default=256, ge=1, description="requests handled at once before consumers pause")
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate (chain): the gRPC server speaks TLS only")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        return self

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return grpc.ssl_server_credentials([(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())])

    def release_key(self) -> bytes | None:
        return self.release_hmac_key.get_secret_value().encode() if self.release_hmac_key else None


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], argv: Sequence[str] | None, service: str) -> S:
    """Parse `argv` (CLI flags) over the environment."""
    return cls(_cli_parse_args=list(argv or []), _cli_prog_name=f"llmesh serve {service}")  # type: ignore[call-arg]
