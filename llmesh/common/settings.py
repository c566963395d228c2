"""Settings shared by every service; each service extends `ServiceSettings` with its own fields.

Values come from the command line (`--grpc-port 50051`), then `LLMESH_*` environment variables
(`LLMESH_KAFKA__BOOTSTRAP=...`), then defaults.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
from aiokafka.helpers import create_ssl_context
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
    # Security (docs/deployment.md "Kafka TLS and SASL"): TLS to the brokers, optionally with a client
    # certificate (mTLS), and/or a SASL login.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = Field(default=None, description="PEM CA bundle of the brokers (default: the system's)")
    ssl_certfile: Path | None = Field(default=None, description="PEM client certificate (chain), for mTLS")
    ssl_keyfile: Path | None = Field(default=None, description="PEM private key of ssl_certfile")
    ssl_password: SecretStr | None = Field(default=None, description="password of an encrypted ssl_keyfile")
    ssl_check_hostname: bool = Field(default=True, description="the broker's certificate must name the host dialled")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        tls, sasl = self.security_protocol in ("SSL", "SASL_SSL"), self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password")
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ValueError("sasl_* settings need security_protocol SASL_PLAINTEXT or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both ssl_certfile and ssl_keyfile, or neither")
        if self.ssl_password and self.ssl_keyfile is None:
            raise ValueError("ssl_password is the password of ssl_keyfile: set ssl_keyfile too")
        if not tls and (self.ssl_cafile or self.ssl_certfile):
            raise ValueError("ssl_* files need security_protocol SSL or SASL_SSL")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """The security arguments of every aiokafka client (producer, consumer, admin) the mesh makes."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=self.ssl_password.get_secret_value() if self.ssl_password else None,
            )
            context.check_hostname = self.ssl_check_hostname  # the chain is verified either way
            kwargs["ssl_context"] = context
        if self.sasl_mechanism and self.sasl_username and self.sasl_password:
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value(),
            }
        return kwargs


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
    release_signers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="named release signers, JSON {id: key}: an event naming its `signer` is checked with that key, and "
        "its author is that id (each person or pipeline its own key; the shared release key names nobody)",
    )
    mesh_hmac_key: SecretStr | None = Field(
        default=None, description="seals the mesh's own Kafka messages (replies, tasks, records); readers refuse others"
    )
    log_level: str = "INFO"
    drain_seconds: float = Field(default=30.0, ge=0, description="how long SIGTERM waits for in-flight work")
    max_in_flight: int = Field(default=256, ge=1, description="requests handled at once before consumers pause")
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate (chain): the gRPC server speaks TLS only")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")
    api_keys_required: bool = Field(
        default=False, description="refuse gRPC calls without a live API key holding the method's scope (llmesh keys)"
    )

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

    def signer_keys(self) -> dict[str, bytes]:
        return {name: key.get_secret_value().encode() for name, key in self.release_signers.items()}

    def mesh_key(self) -> bytes | None:
        key = self.mesh_hmac_key.get_secret_value() if self.mesh_hmac_key else ""
        return key.encode() if key else None  # empty (compose without the variable): unsealed, with a warning


class ClientSettings(BaseSettings):
    """What a client of the mesh (the CLI publishing a release, a benchmark) reads: LLMESH_KAFKA__*."""

    model_config = SettingsConfigDict(env_prefix="LLMESH_", env_nested_delimiter="__", extra="ignore")

    kafka: KafkaSettings = KafkaSettings()


def kafka_from_env(bootstrap: str | None = None) -> KafkaSettings:
    """The Kafka settings of LLMESH_KAFKA__* (security included), with `bootstrap` instead when given."""
    settings = ClientSettings().kafka
    return settings.model_copy(update={"bootstrap": bootstrap}) if bootstrap else settings


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], argv: Sequence[str] | None, service: str) -> S:
    """Parse `argv` (CLI flags) over the environment."""
    return cls(_cli_parse_args=list(argv or []), _cli_prog_name=f"llmesh serve {service}")  # type: ignore[call-arg]
