"""`llmesh up` / `down` / `status`: the whole mesh as local processes on one machine."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmesh import client
from llmesh.common import kafka
from llmesh.common.registry import Registry
from llmesh.common.settings import KafkaSettings
from llmesh.stack import binaries, processes
from llmesh.stack.layout import SERVICES, StackLayout, free_port

DEMO_MODEL = "chat"
Report = Callable[[str], None]
# Stop order: the supervisor first (it would start the others again), clients of a server before the server.
STOP_ORDER = ("supervisor", "gateway", "tokenize", "eval", "infer", "redis", "broker")  # infer stops its tritonserver


def demo_model_dir(models_dir: Path, version: int) -> Path:
    return models_dir / f"{DEMO_MODEL}-v{version}"


def ensure_demo_models(models_dir: Path, report: Report) -> None:
    from llmesh.lm.build import DEMO_RECIPES, build_model, ensure_chat_template  # torch: imported only when needed

    for version, recipe in DEMO_RECIPES.items():
        target = demo_model_dir(models_dir, version)
        if (target / "model.safetensors").exists():
            if ensure_chat_template(target):  # built before the demo models had a chat template
                report(f"added the chat template to demo model {DEMO_MODEL} v{version}")
            continue
        report(f"building demo model {DEMO_MODEL} v{version} (CPU, about a minute)")
        staging = target.with_name(target.name + ".building")
        summary = build_model(recipe, staging)
        staging.rename(target)
        report(f"  built in {summary['build_seconds']}s, final loss {summary['final_loss']}")


def running(layout: StackLayout) -> list[str]:
    return [name for name in [*STOP_ORDER, *extra_replicas(layout)] if processes.pid_of(layout, name)]


def _start_infrastructure(layout: StackLayout, report: Report) -> None:
    start_broker(layout)
    start_redis(layout)
    report(f"broker and redis are up ({layout.home / 'logs'})")


def start_broker(layout: StackLayout) -> int:
    """The Kafka-protocol broker (in-memory storage: a restart loses every topic; the services cope)."""
    port = layout.ports["broker"]
    listener = f"tcp://127.0.0.1:{port}"
    argv = [str(binaries.tansu()), "broker", "--listener-url", listener, "--advertised-listener-url", listener]
    pid = processes.start(layout, "broker", [*argv, "--storage-engine", "memory://tansu/"])
    processes.wait_for_port(port, 15, "broker", pid)
    return pid


def start_redis(layout: StackLayout) -> int:
    """Redis with an append-only file: a restart keeps the registry (routing, versions, keys)."""
    redis_dir = layout.home / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = layout.ports["redis"]
    argv = [str(binaries.redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
    pid = processes.start(layout, "redis", argv)
    processes.wait_for_port(port, 15, "redis", pid)
    return pid


def triton_command(layout: StackLayout, repository: Path, grpc_port: int, http_port: int, metrics_port: int) -> list[str]:
    """The tritonserver command line (explicit model control) an infer replica runs for `repository`."""
    repository.mkdir(parents=True, exist_ok=True)
    backends = binaries.build_triton_backends(layout.triton_backends)
    return [
        str(binaries.triton_root() / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        f"--backend-directory={backends}",
        "--disable-auto-complete-config",
        "--pinned-memory-pool-byte-size=0",
        "--exit-timeout-secs=10",
        "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
        "--http-address=127.0.0.1", f"--http-port={http_port}",
        "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
        "--log-verbose=0",
    ]  # fmt: skip


def infer_env(layout: StackLayout, repository: Path, grpc_port: int, http_port: int, metrics_port: int) -> dict[str, str]:
    """What an infer replica needs to run (and supervise) its own tritonserver."""
    return {
        "LLMESH_TRITON_URL": f"127.0.0.1:{grpc_port}",
        "LLMESH_MODEL_REPOSITORY": str(repository),
        "LLMESH_TRITON_COMMAND": json.dumps(triton_command(layout, repository, grpc_port, http_port, metrics_port)),
        "LLMESH_TRITON_ENV": json.dumps(binaries.triton_env()),
    }


def service_env(layout: StackLayout, name: str) -> dict[str, str]:
    """The environment the stack gives service `name` (its ports, the broker, Redis, Triton)."""
    p = layout.ports
    env = {
        "LLMESH_GRPC_PORT": str(p[name]),
        "LLMESH_METRICS_PORT": str(p[f"{name}_metrics"]),
        "LLMESH_KAFKA__BOOTSTRAP": layout.address("broker"),
        "LLMESH_REDIS_URL": layout.redis_url,
        "LLMESH_RELEASE_HMAC_KEY": layout.release_key(),  # secure by default: only signed releases apply
        "LLMESH_MESH_HMAC_KEY": layout.mesh_key(),  # and only the services' own sealed replies are trusted
    }
    if name == "gateway":
        env["LLMESH_HTTP_PORT"] = str(p["gateway_http"])  # its OpenAI-compatible HTTP API
    if name == "infer":
        env["LLMESH_REPLICA"] = "infer"  # one name across restarts: a restarted replica settles its own leases
        env |= infer_env(layout, layout.triton_repository, p["triton_grpc"], p["triton_http"], p["triton_metrics"])
        env["LLMESH_MODEL_STORE"] = str(layout.model_store)  # shared by every infer replica
        roots = [layout.models_dir, *layout.artifact_roots]  # and the store itself: nothing else
        env["LLMESH_ARTIFACT_ROOTS"] = json.dumps([str(root) for root in roots])
    return env


def start_service(layout: StackLayout, name: str) -> int:
    """Start one service of the stack (also used to restart one that was stopped or killed)."""
    return processes.start(layout, name, [sys.executable, "-m", f"services.{name}"], service_env(layout, name))


def extra_replicas(layout: StackLayout) -> dict[str, dict[str, int]]:
    """Infer replicas beyond the first, by name (`infer-2`, ...): their ports, running or not."""
    folder = layout.home / "replicas"
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("infer-*.json")} if folder.is_dir() else {}
    return dict(sorted(found.items(), key=lambda item: int(item[0].rsplit("-", 1)[1])))


def scale_infer(layout: StackLayout, replicas: int, report: Report) -> None:
    """Run `replicas` infer replicas (each with its own tritonserver): start the missing ones (each
    loads the desired set before it takes requests), stop the newest beyond the count."""
    for index in range(2, replicas + 1):
        name = f"infer-{index}"
        if not processes.pid_of(layout, name):
            report(f"{name} is SERVING at {start_infer_replica(layout, name)}")
    for name in extra_replicas(layout):
        if int(name.rsplit("-", 1)[1]) > replicas:
            processes.stop(layout, name)
            (layout.home / "replicas" / f"{name}.json").unlink(missing_ok=True)
            report(f"{name} stopped")


def start_infer_replica(layout: StackLayout, name: str, timeout: float = 120) -> str:
    """Another infer replica (running its own tritonserver) in infer's consumer group; returns its gRPC
    address once SERVING (it has loaded what the desired state needs and joined the group)."""
    ports = extra_replicas(layout).get(name) or {
        port: free_port() for port in ("grpc", "metrics", "triton_grpc", "triton_http", "triton_metrics")
    }
    (layout.home / "replicas").mkdir(exist_ok=True)
    (layout.home / "replicas" / f"{name}.json").write_text(json.dumps(ports))
    repository = layout.home / name / "triton-models"
    triton = infer_env(layout, repository, ports["triton_grpc"], ports["triton_http"], ports["triton_metrics"])
    env = (
        service_env(layout, "infer")
        | triton
        | {
            "LLMESH_GRPC_PORT": str(ports["grpc"]),
            "LLMESH_METRICS_PORT": str(ports["metrics"]),
            "LLMESH_REPLICA": name,
        }
    )
    pid = processes.start(layout, name, [sys.executable, "-m", "services.infer"], env)
    address = f"127.0.0.1:{ports['grpc']}"
    deadline = time.monotonic() + timeout
    while client.health_status(address, timeout=0.5) != "SERVING":
        if not processes.alive(pid) or time.monotonic() > deadline:
            raise processes.StartFailed(f"{name} is not SERVING after {timeout:.0f}s; see {layout.logs / name}.log")
        time.sleep(0.2)
    return address


def start_supervisor(layout: StackLayout) -> int:
    """The process that starts crashed processes of the stack again (llmesh/stack/supervisor.py)."""
    return processes.start(layout, "supervisor", [sys.executable, "-m", "llmesh.stack.supervisor", str(layout.home)])


def _start_services(layout: StackLayout, report: Report, timeout: float = 90.0) -> None:
    _wait_serving(layout, {name: start_service(layout, name) for name in SERVICES}, timeout)
    report("gateway, tokenize, infer (with its tritonserver) and eval are SERVING")


def _wait_serving(layout: StackLayout, pids: dict[str, int], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            if not processes.alive(pids[name]):
                log = layout.logs / f"{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                raise processes.StartFailed(f"{name} exited during start-up; see {log}:\n{tail}")
            if client.health_status(layout.address(name), timeout=0.5) == "SERVING":
                waiting.discard(name)
        time.sleep(0.1)
    if waiting:
        raise processes.StartFailed(f"not SERVING after {timeout:.0f}s: {', '.join(sorted(waiting))}")


async def _publish_first_release(layout: StackLayout, report: Report, timeout: float = 120.0) -> int:
    registry = Registry.from_url(layout.redis_url)
    try:
        primary = await registry.primary(DEMO_MODEL)
        if not primary:
            folder = demo_model_dir(layout.models_dir, 1)
            event = client.release_for(
                DEMO_MODEL,
                1,
                folder,
                label="demo-v1",
                author="llmesh up",
                reason="first release",
                provenance=client.build_provenance(folder),
            )
            await client.publish_release(layout.address("broker"), event)
            report(f"published release {DEMO_MODEL} v1; waiting for infer to load it in Triton")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            primary = await registry.primary(DEMO_MODEL)
            record = await registry.version(DEMO_MODEL, primary) if primary else None
            if record and record.state == "SERVING":
                return primary
            if (failed := await registry.version(DEMO_MODEL, 1)) and failed.state == "FAILED":
                raise processes.StartFailed(f"release refused: {failed.reason}")
            await asyncio.sleep(0.2)
        raise processes.StartFailed(f"{DEMO_MODEL} is not SERVING after {timeout:.0f}s; see the infer log")
    finally:
        await registry.close()


def up(
    home: Path,
    report: Report,
    *,
    free_ports: bool = False,
    models_dir: Path | None = None,
    infer_replicas: int = 1,
    artifact_roots: list[Path] | None = None,
) -> StackLayout:
    existing = StackLayout.load(home)
    if existing and running(existing):
        repair(existing, report)
        return existing
    for binary in (binaries.tansu, binaries.redis_server, binaries.triton_root):
        binary()  # what is not installed fails now, by name (llmesh[stack], llmesh[infer])
    layout = StackLayout.create(home, free_ports=free_ports, models_dir=models_dir, artifact_roots=artifact_roots)
    layout.save()
    # this process (the CLI, a test, a benchmark) publishes releases too: it signs with the stack's key
    os.environ["LLMESH_RELEASE_HMAC_KEY"] = layout.release_key()
    ensure_demo_models(layout.models_dir, report)
    try:
        _start_infrastructure(layout, report)
        asyncio.run(kafka.ensure_topics(KafkaSettings(bootstrap=layout.address("broker"))))  # the embedded broker: plaintext
        _start_services(layout, report)
        version = asyncio.run(_publish_first_release(layout, report))
        scale_infer(layout, infer_replicas, report)
        start_supervisor(layout)
    except BaseException:
        down(home, lambda _: None)
        raise
    report(f"model {DEMO_MODEL} v{version} is SERVING; crashed processes are started again (llmesh status)")
    report(f"OpenAI-compatible HTTP API: {layout.http_url()}")
    return layout


def repair(layout: StackLayout, report: Report) -> list[str]:
    """`llmesh up` on a stack that runs in part: start what is not running (a killed process, the
    supervisor itself), keep what is; returns the names started."""
    os.environ["LLMESH_RELEASE_HMAC_KEY"] = layout.release_key()
    processes.stop(layout, "supervisor")  # started again last: it must not race this repair
    started = []
    for name, start in (("broker", start_broker), ("redis", start_redis)):
        if not processes.pid_of(layout, name):
            start(layout)
            started.append(name)
    services = {name: start_service(layout, name) for name in SERVICES if not processes.pid_of(layout, name)}
    _wait_serving(layout, services)
    started += list(services)
    for name in extra_replicas(layout):
        if not processes.pid_of(layout, name):
            start_infer_replica(layout, name)
            started.append(name)
    start_supervisor(layout)
    report(
        f"the stack in {layout.home} was running in part; started again: {', '.join(started)}"
        if started
        else "every process of the stack is running"
    )
    return started


def down(home: Path, report: Report) -> list[str]:
    layout = StackLayout.load(home)
    if layout is None:
        return []
    order = [*STOP_ORDER[: STOP_ORDER.index("infer")], *extra_replicas(layout), *STOP_ORDER[STOP_ORDER.index("infer") :]]
    stopped = [name for name in order if processes.stop(layout, name)]
    report(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return stopped
