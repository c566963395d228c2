"""Client-side helpers used by the CLI, the embedded stack and the tests: publish a release, call the
gateway, check health."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common import kafka, topics
from llmesh.common.events import Provenance, ReleaseEvent, ReleaseMode, artifact_digests
from llmesh.common.prompts import PromptRelease
from llmesh.common.settings import KafkaSettings


def release_key() -> bytes | None:
    """The operator's release signing key: LLMESH_RELEASE_HMAC_KEY (as the services read it), else
    the key the embedded stack in LLMESH_HOME (default `.llmesh`) made for itself."""
    if key := os.environ.get("LLMESH_RELEASE_HMAC_KEY"):
        return key.encode()
    path = Path(os.environ.get("LLMESH_HOME", ".llmesh")) / "release.key"
    return path.read_text().strip().encode() if path.exists() else None


BUILD_FILE = "llmesh_build.json"  # what `llmesh model build` writes beside the weights


def build_provenance(artifacts: Path) -> Provenance | None:
    """The lineage that `llmesh model build` recorded in the folder, if it did."""
    path = artifacts / BUILD_FILE
    if not path.is_file():
        return None
    declared = json.loads(path.read_text()).get("provenance")
    return Provenance.model_validate(declared) if declared else None


def release_signer() -> str:
    """LLMESH_RELEASE_SIGNER: the named signer whose key LLMESH_RELEASE_HMAC_KEY is ('' for the shared key)."""
    return os.environ.get("LLMESH_RELEASE_SIGNER", "")


def release_for(model: str, version: int, artifacts: Path, **fields: object) -> ReleaseEvent:
    """A release of `artifacts` with the sha256 of every file computed here, signed when a key is set
    (by the named signer LLMESH_RELEASE_SIGNER, its author then, when that is set)."""
    directory = artifacts.resolve()
    event = ReleaseEvent(
        model=model,
        version=version,
        artifact_uri=directory.as_uri(),
        sha256=artifact_digests(directory),
        mode=fields.pop("mode", ReleaseMode.SWAP),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )
    return event.signed(release_key(), release_signer())


async def publish_release(kafka_settings: KafkaSettings | str, event: ReleaseEvent) -> None:
    """Publish `event` on the release topic; a bare bootstrap string means a plaintext broker (the
    embedded stack's), KafkaSettings carry TLS and SASL (settings.kafka_from_env reads LLMESH_KAFKA__*)."""
    await _produce(kafka_settings, topics.RELEASES, *kafka.release_record(event))


async def publish_prompt_release(kafka_settings: KafkaSettings | str, event: PromptRelease) -> None:
    """Publish `event` (a scenario's template version, or a promotion or rollback) on the prompts topic."""
    await _produce(kafka_settings, topics.PROMPTS, *kafka.prompt_record(event))


async def _produce(kafka_settings: KafkaSettings | str, topic: str, value: bytes, key: bytes, headers: dict[str, str]) -> None:
    if isinstance(kafka_settings, str):
        kafka_settings = KafkaSettings(bootstrap=kafka_settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_settings.bootstrap, acks="all", client_id="llmesh-cli", **kafka_settings.client_kwargs()
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=[(k, v.encode()) for k, v in headers.items()])
    finally:
        await producer.stop()


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends the API key with every call."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _with_key(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("x-api-key", self.key)]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)


def channel(address: str, api_key: str | None = None, tls_ca: Path | None = None) -> grpc.Channel:
    """A channel to any service of the mesh (gateway, tokenize, infer, eval): TLS when `tls_ca` (the
    CA that signed the service's certificate; default: LLMESH_TLS_CA) is given, and the API key
    (default: LLMESH_API_KEY) on every call, for services that require keys."""
    tls_ca = tls_ca or (Path(os.environ["LLMESH_TLS_CA"]) if os.environ.get("LLMESH_TLS_CA") else None)
    if tls_ca is not None:
        plain = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))
    else:
        plain = grpc.insecure_channel(address)
    key = api_key or os.environ.get("LLMESH_API_KEY")
    return grpc.intercept_channel(plain, _ApiKey(key)) if key else plain


gateway_channel = channel


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """SERVING, NOT_SERVING, UNKNOWN or UNREACHABLE."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"
