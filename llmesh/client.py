"""Client-side helpers used by the CLI, the embedded stack and the tests: publish a release, call the
gateway, check health."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common import kafka, topics
from llmesh.common.events import ReleaseEvent, ReleaseMode, artifact_digests


def release_key() -> bytes | None:
    """The operator's release signing key, from LLMESH_RELEASE_HMAC_KEY (as the services read it)."""
    key = os.environ.get("LLMESH_RELEASE_HMAC_KEY")
    return key.encode() if key else None


def release_for(model: str, version: int, artifacts: Path, **fields: object) -> ReleaseEvent:
    """A release of `artifacts` with the sha256 of every file computed here, signed when a key is set."""
    directory = artifacts.resolve()
    event = ReleaseEvent(
        model=model,
        version=version,
        artifact_uri=directory.as_uri(),
        sha256=artifact_digests(directory),
        mode=fields.pop("mode", ReleaseMode.SWAP),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )
    return event.signed(release_key())


async def publish_release(bootstrap: str, event: ReleaseEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="llmesh-cli")
    await producer.start()
    try:
        value, key, headers = kafka.release_record(event)
        await producer.send_and_wait(topics.RELEASES, value, key=key, headers=[(k, v.encode()) for k, v in headers.items()])
    finally:
        await producer.stop()


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """SERVING, NOT_SERVING, UNKNOWN or UNREACHABLE."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"
