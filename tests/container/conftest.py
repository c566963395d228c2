"""The mesh as containers: the images of deploy/docker, a Kafka-protocol broker and Redis on a private
docker network, started by testcontainers from images built here from nothing (no registry needed)."""

from __future__ import annotations

import os

# testcontainers reads these when imported. Its reaper image cannot be pulled here, and these machines
# have /.dockerenv, which would make it reach published ports through the bridge gateway.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TC_HOST", "127.0.0.1")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import docker
import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from llmesh import client
from llmesh.stack import binaries
from llmesh.stack.layout import free_port
from llmesh.v1 import gateway_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
IMAGES = Path(__file__).resolve().parent / "images"
TAG = metadata.version("llmesh")  # the tag build-images.sh gives the images of this version
BROKER_IMAGE = "llmesh-test/broker:tansu-0.6.0"
REDIS_IMAGE = "llmesh-test/redis:7"
# start order: gateway last; two infer replicas, each with its own tritonserver
GRPC_PORTS = {"eval": 50054, "tokenize": 50052, "infer": 50053, "infer-2": 50053, "gateway": 50051}
HTTP_PORT = 8080  # the gateway's
RELEASE_KEY = "container-release-key"
MESH_KEY = "container-test-mesh-key"


@pytest.fixture(scope="session")
def docker_engine() -> docker.DockerClient:
    """The engine `make test` started (deploy/tools/docker-engine.sh); the tests skip without one, but not in CI."""
    try:
        engine = docker.from_env()
        engine.ping()
    except docker.errors.DockerException as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a Docker engine for the container tests: {err}")
        pytest.skip(f"no Docker engine answers ({err}); deploy/tools/docker-engine.sh starts one")
    return engine


@pytest.fixture(scope="session")
def images(docker_engine: docker.DockerClient) -> dict[str, float]:
    """Every image the container tests run, built here (seconds each step took)."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    subprocess.run([str(REPO / "deploy" / "docker" / "build-images.sh")], check=True, env=os.environ | {"TAG": TAG})
    timings["llmesh images"] = time.monotonic() - started
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(binaries.tansu(), Path(context) / "tansu")
        for image, dockerfile, network in ((BROKER_IMAGE, "broker", "none"), (REDIS_IMAGE, "redis", "host")):
            started = time.monotonic()
            dockerfile_path = str(IMAGES / f"{dockerfile}.Dockerfile")
            docker_engine.images.build(path=context, dockerfile=dockerfile_path, tag=image, network_mode=network, rm=True)
            timings[image] = time.monotonic() - started
    print("image builds (s):", {name: round(seconds, 1) for name, seconds in timings.items()})
    return timings


@dataclass
class ContainerMesh:
    """The running containers; `gateway` and `bootstrap` are their addresses as seen from this host."""

    models_dir: Path
    gateway: str = ""
    bootstrap: str = ""
    containers: dict[str, DockerContainer] = field(default_factory=dict)

    def release(self, model: str, version: int, artifacts: str, **fields: object) -> None:
        """An operator's release event, published from this host with the project's Kafka client."""
        event = client.release_for(model, version, self.models_dir / artifacts, **fields)
        asyncio.run(client.publish_release(self.bootstrap, event))

    def logs(self, name: str) -> str:
        out, err = self.containers[name].get_logs()
        return (out + err).decode(errors="replace")


def _service(name: str, network: Network, models_dir: Path, store: Path) -> DockerContainer:
    service = name.split("-")[0]  # infer-2: a second replica of infer
    container = (
        DockerContainer(f"llmesh/{service}:{TAG}")
        .with_network(network)
        .with_network_aliases(name)
        .with_exposed_ports(GRPC_PORTS[name])
        .with_env("LLMESH_KAFKA__BOOTSTRAP", "kafka:9092")
        .with_env("LLMESH_REDIS_URL", "redis://redis:6379/0")
        .with_env("LLMESH_RELEASE_HMAC_KEY", RELEASE_KEY)
        .with_env("LLMESH_MESH_HMAC_KEY", MESH_KEY)
        .with_env("LLMESH_ARTIFACT_ROOTS", f'["{models_dir}"]')
        .with_volume_mapping(str(models_dir), str(models_dir), "ro")  # release paths mean the same inside
    )
    if service == "gateway":
        container.with_exposed_ports(HTTP_PORT)  # the OpenAI-compatible HTTP API
    if service == "infer":
        container.with_kwargs(shm_size="1g")  # Triton's python backend talks to its stubs through /dev/shm
        container.with_volume_mapping(str(store), "/model-store", "rw")  # shared by the replicas, as a RWX volume
    return container


def _model_store(models_dir: Path, store: Path) -> Path:
    """The demo models as an operator's model store: readable by the images' unprivileged user."""
    for version in (1, 2):
        shutil.copytree(models_dir / f"chat-v{version}", store / f"chat-v{version}")
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return store


def _wait_serving(mesh: ContainerMesh, name: str, timeout: float = 180) -> None:
    container = mesh.containers[name]
    address = f"127.0.0.1:{container.get_exposed_port(GRPC_PORTS[name])}"
    deadline = time.monotonic() + timeout
    while client.health_status(address, timeout=0.5) != "SERVING":
        container.get_wrapped_container().reload()
        status = container.get_wrapped_container().status
        if status != "running" or time.monotonic() > deadline:
            raise RuntimeError(f"{name} is {status}, not SERVING after {timeout:.0f}s:\n{mesh.logs(name)[-3000:]}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def container_mesh(
    images: dict[str, float], models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerMesh]:
    """Redis, the broker (with a `tansu proxy` giving host clients their own advertised address), and
    the four services, each SERVING. Module-scoped: nothing is left running for the next module."""
    mesh = ContainerMesh(_model_store(models_dir, tmp_path_factory.mktemp("operator-models")))
    store = tmp_path_factory.mktemp("model-store")
    store.chmod(0o777)  # written by the images' unprivileged user
    host_port = free_port()
    started = time.monotonic()
    with Network() as network, pytest.MonkeyPatch.context() as env:
        env.setenv("LLMESH_RELEASE_HMAC_KEY", RELEASE_KEY)
        infrastructure = {
            "redis": DockerContainer(REDIS_IMAGE)
            .with_network(network)
            .with_network_aliases("redis")
            .waiting_for(LogMessageWaitStrategy("Ready to accept connections")),
            "broker": DockerContainer(BROKER_IMAGE)
            .with_network(network)
            .with_network_aliases("kafka")
            .with_command(
                "broker --listener-url tcp://0.0.0.0:9092 --advertised-listener-url tcp://kafka:9092"
                " --storage-engine memory://tansu/"
            )
            .waiting_for(LogMessageWaitStrategy("ready in")),
            "broker-proxy": DockerContainer(BROKER_IMAGE)
            .with_network(network)
            .with_bind_ports(9092, host_port)
            .with_command(
                f"proxy --listener-url tcp://0.0.0.0:9092 --advertised-listener-url tcp://127.0.0.1:{host_port}"
                " --origin-url tcp://kafka:9092"
            ),
        }
        try:
            for name, container in infrastructure.items():
                mesh.containers[name] = container.start()
            for name in GRPC_PORTS:
                mesh.containers[name] = _service(name, network, mesh.models_dir, store).start()
            for name in GRPC_PORTS:
                _wait_serving(mesh, name)
            mesh.gateway = f"127.0.0.1:{mesh.containers['gateway'].get_exposed_port(GRPC_PORTS['gateway'])}"
            mesh.bootstrap = f"127.0.0.1:{host_port}"
            print(f"containers SERVING {time.monotonic() - started:.1f}s after the first started")
            yield mesh
        finally:
            logs = tmp_path_factory.mktemp("container-logs")
            for name, container in reversed(mesh.containers.items()):
                (logs / f"{name}.log").write_text(mesh.logs(name))
                container.stop()
            print(f"container logs: {logs}")


@pytest.fixture(scope="module")
def gateway(container_mesh: ContainerMesh) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with client.gateway_channel(container_mesh.gateway) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)
