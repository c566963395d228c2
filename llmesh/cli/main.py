"""The `llmesh` command."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Optional

import grpc
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmesh import client
from llmesh.cli import audit as audit_cli
from llmesh.cli import bench as bench_cli
from llmesh.cli import eval as eval_cli
from llmesh.cli import keys as keys_cli
from llmesh.cli import scenario as scenario_cli
from llmesh.cli.stackredis import BootstrapOpt, release_target
from llmesh.common.events import Provenance, ReleaseMode
from llmesh.stack import binaries, processes, stack, supervisor
from llmesh.stack.layout import SERVICES, StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

app = typer.Typer(
    help="llmesh: an event-driven mesh serving language models through Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Demo models.", no_args_is_help=True, pretty_exceptions_enable=False)
release_app = typer.Typer(help="Release events.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(model_app, name="model")
app.add_typer(release_app, name="release")
app.add_typer(eval_cli.app, name="eval")
app.add_typer(keys_cli.app, name="keys")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(scenario_cli.app, name="scenario")
app.command("bench")(bench_cli.bench)
console = Console()
err_console = Console(stderr=True)

HomeOpt = Annotated[Path, typer.Option(envvar="LLMESH_HOME", help="the embedded stack's folder")]


def _say(line: str) -> None:
    console.print(f"[bold cyan]llmesh[/] {line}")


def _layout(home: Path) -> StackLayout:
    layout = StackLayout.load(home.resolve())
    if layout is None:
        err_console.print(f"no stack in {home}: run llmesh up")
        raise typer.Exit(2)
    return layout


@app.command()
def up(
    home: HomeOpt = Path(".llmesh"),
    free_ports: Annotated[bool, typer.Option(help="pick free ports instead of the defaults")] = False,
    infer_replicas: Annotated[int, typer.Option(min=1, help="infer replicas, each with its own tritonserver")] = 1,
    artifact_root: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="a folder releases may name (repeatable; the demo models' folder always may)"),
    ] = None,
) -> None:
    """Start broker, Redis and the four services (infer runs tritonserver); serve the demo model.
    Releases must be signed (a key is made once in the home folder) and name allowed folders."""
    started = time.perf_counter()
    try:
        layout = stack.up(
            home.resolve(), _say, free_ports=free_ports, infer_replicas=infer_replicas, artifact_roots=artifact_root
        )
    except (processes.StartFailed, binaries.NotInstalled) as err:
        err_console.print(f"[red]llmesh up failed:[/] {escape(str(err))}")
        raise typer.Exit(1) from err
    _say(f"up in {time.perf_counter() - started:.1f}s")
    _print_status(layout)


@app.command()
def down(home: HomeOpt = Path(".llmesh")) -> None:
    """Stop every process of the stack."""
    stack.down(home.resolve(), _say)


@app.command()
def scale(
    service: Annotated[str, typer.Argument(help="the service to scale: infer")],
    replicas: Annotated[int, typer.Argument(min=1, help="how many replicas to run")],
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Run N replicas of infer on a running stack: new ones load the desired set before taking requests."""
    if service != "infer":
        err_console.print(f"[red]only infer scales in the embedded stack[/], not {service!r}")
        raise typer.Exit(2)
    layout = _layout(home)
    try:
        stack.scale_infer(layout, replicas, _say)
    except processes.StartFailed as err:
        err_console.print(f"[red]llmesh scale failed:[/] {err}")
        raise typer.Exit(1) from err
    _print_status(layout)


@app.command()
def status(home: HomeOpt = Path(".llmesh")) -> None:
    """Processes, addresses and health of the stack."""
    _print_status(_layout(home))


def _print_status(layout: StackLayout) -> None:
    table = Table(title=f"llmesh stack in {layout.home}")
    for column in ("process", "pid", "listens on", "health", "restarts", "metrics"):
        table.add_column(column)
    restarted = supervisor.restarts(layout)

    def row(name: str, pid: int | None, address: str, health: str, metrics: str) -> None:
        count = int(restarted.get(name, {}).get("restarts", 0))
        table.add_row(name, str(pid or "-"), address, health, str(count) if count else "-", metrics)

    for name in ("supervisor", "broker", "redis", "tritonserver", *SERVICES):
        pid = processes.pid_of(layout, name)
        if name == "tritonserver" and (infer := processes.pid_of(layout, "infer")):
            pid = processes.child_named(infer, name)  # infer runs it
        port = layout.ports.get(name) or layout.ports.get("triton_grpc")
        health = client.health_status(layout.address(name)) if name in SERVICES else ("running" if pid else "stopped")
        metrics = f"http://127.0.0.1:{layout.ports[name + '_metrics']}/metrics" if name in SERVICES else ""
        address = f"127.0.0.1:{port}" if name != "supervisor" else ""
        if name == "gateway":
            address += f"\n{layout.http_url()} (OpenAI-compatible HTTP)"
        row(name, pid, address, health, metrics)
    for name, ports in stack.extra_replicas(layout).items():
        address, pid = f"127.0.0.1:{ports['grpc']}", processes.pid_of(layout, name)
        health = client.health_status(address) if pid else "stopped"
        row(name, pid, address, health, f"http://127.0.0.1:{ports['metrics']}/metrics")
    console.print(table)
    console.print(f"logs: {layout.logs}")


def _gateway(home: Path, gateway: str | None) -> gateway_pb2_grpc.GatewayStub:
    address = gateway or _layout(home).address("gateway")
    return gateway_pb2_grpc.GatewayStub(client.gateway_channel(address))


def _admin(home: Path, gateway: str | None) -> gateway_pb2_grpc.AdminStub:
    address = gateway or _layout(home).address("gateway")
    return gateway_pb2_grpc.AdminStub(client.gateway_channel(address))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt (none with --scenario: its template renders it)")] = "",
    model: Annotated[Optional[str], typer.Option(help="alias or NAME@VERSION (default: chat, or the scenario's)")] = None,  # noqa: UP045
    scenario: Annotated[str, typer.Option(help="a released scenario (llmesh scenario list)")] = "",
    var: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="NAME=VALUE for the scenario's template (repeatable; JSON values typed)"),
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they arrive")] = False,
    max_tokens: Optional[int] = None,  # noqa: UP045 - typer needs Optional
    temperature: Optional[float] = None,  # noqa: UP045
    top_p: Optional[float] = None,  # noqa: UP045
    seed: Optional[int] = None,  # noqa: UP045
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None,  # noqa: UP045
    gateway: Annotated[Optional[str], typer.Option(help="gateway host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Generate text through the gateway."""
    sampling = common_pb2.SamplingParams(stop=stop or [])
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(sampling, field, value)
    request = gateway_pb2.GenerateRequest(
        model=model if model is not None else ("" if scenario else "chat"), prompt=prompt, sampling=sampling, scenario=scenario
    )
    request.variables.update(_variables(var or []))
    stub = _gateway(home, gateway)
    try:
        if stream:
            last = None
            for chunk in stub.GenerateStream(request, timeout=120):
                console.print(chunk.text, end="", markup=False, highlight=False)
                last = chunk
            console.print()
            if last is not None:
                _say(
                    f"{last.model}@{last.version}, {common_pb2.FinishReason.Name(last.finish_reason)}, {last.usage.completion_tokens} tokens"
                )
        else:
            reply = stub.Generate(request, timeout=120)
            console.print(reply.text, markup=False, highlight=False)
            _say(
                f"{reply.model}@{reply.version}, {common_pb2.FinishReason.Name(reply.finish_reason)}, {reply.usage.completion_tokens} tokens"
            )
    except grpc.RpcError as err:
        err_console.print(f"[red]{err.code().name}[/]: {err.details()}")
        raise typer.Exit(1) from err


def _variables(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; a value that reads as JSON (3, 0.5, true) keeps its type, others are text."""
    variables: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--var {pair!r}: expected NAME=VALUE")
        try:
            variables[name] = json.loads(value)
        except ValueError:
            variables[name] = value
    return variables


@app.command()
def models(
    history: Annotated[Optional[str], typer.Option(help="show the state history of this model")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
    gateway: Optional[str] = None,  # noqa: UP045
) -> None:
    """Models, their versions and states (and a model's history), as the gateway sees them."""
    stub = _gateway(home, gateway)
    if history:
        info = stub.GetModel(gateway_pb2.GetModelRequest(name=history), timeout=10)
        table = Table(
            "time",
            "version",
            "state",
            "reason",
            title=f"{history}: primary v{info.primary_version}, previous v{info.previous_version}",
        )
        for entry in info.history:
            state = common_pb2.VersionState.Name(entry.state).removeprefix("VERSION_STATE_")
            table.add_row(time.strftime("%H:%M:%S", time.localtime(entry.at)), str(entry.version), state, entry.reason)
        console.print(table)
        console.print(_lineage(info))
        _print_pending([info])
        return
    reply = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    table = Table("model", "version", "state", "primary", "label", "reason")
    for info in reply.models:
        for v in info.versions:
            state = common_pb2.VersionState.Name(v.state).removeprefix("VERSION_STATE_")
            table.add_row(info.name, str(v.version), state, "*" if v.version == info.primary_version else "", v.label, v.reason)
    console.print(table)
    _print_pending(reply.models)


def _print_pending(infos: Iterable[gateway_pb2.ModelInfo]) -> None:
    """One line per release that waits for approval, with the command that approves it."""
    for info in infos:
        if info.HasField("pending"):
            p = info.pending
            by = f" by {', '.join(p.approvals)}" if p.approvals else ""
            expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.expires_at))
            _say(
                f"{info.name} v{p.version} ({p.mode}, released by {p.author or 'unnamed'}) waits for approval: "
                f"{len(p.approvals)}/{p.needed}{by}, until {expires}; llmesh release approve {info.name} {p.version}"
            )


def _lineage(info: gateway_pb2.ModelInfo) -> Table:
    """Each version's author and provenance, as its release event declared them."""
    table = Table("version", "author", "lineage", title=f"{info.name}: lineage")
    for v in info.versions:
        p = v.provenance
        declared = [
            f"base {p.base_model or 'none'}" + (f" ({p.base_model_digest[:12]})" if p.base_model_digest else ""),
            f"data {p.training_data_digest[:12]}" if p.training_data_digest else "",
            f"code {p.training_code_commit[:12]}" if p.training_code_commit else "",
            f"run {p.training_run_id}" if p.training_run_id else "",
            ", ".join(f"{k}={val:g}" for k, val in sorted(p.evaluation.items())),
            ", ".join(f"{k}={val}" for k, val in sorted(p.tags.items())),
        ]
        lineage = "\n".join(escape(line) for line in declared if line) if v.HasField("provenance") else "not declared"
        table.add_row(str(v.version), escape(v.author), lineage)
    return table


@model_app.command("build")
def model_build(
    out: Annotated[Path, typer.Option(help="folder that receives one sub-folder per version")] = Path(".llmesh/models"),
    version: Annotated[Optional[list[int]], typer.Option(help="demo version(s) to build (default: all)")] = None,  # noqa: UP045
    force: bool = False,
) -> None:
    """Train the demo models (small GPT-style causal LMs, Hugging Face layout) on this CPU."""
    from llmesh.lm.build import DEMO_RECIPES, build_model  # torch: imported only when needed

    for number in version or sorted(DEMO_RECIPES):
        target = out / f"{stack.DEMO_MODEL}-v{number}"
        if (target / "model.safetensors").exists() and not force:
            _say(f"{target} exists (use --force to rebuild)")
            continue
        _say(f"building {target}")
        summary = build_model(DEMO_RECIPES[number], target)
        console.print_json(json.dumps(summary))


@release_app.command("publish")
def release_publish(
    model: Annotated[str, typer.Option()],
    version: Annotated[int, typer.Option()],
    artifacts: Annotated[Path, typer.Option(help="the version's Hugging Face folder")],
    mode: ReleaseMode = ReleaseMode.SWAP,
    share: Annotated[int, typer.Option(min=0, max=100, help="percent mirrored (shadow) or served (canary)")] = 100,
    label: str = "",
    author: str = "",
    reason: str = "",
    provenance: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="the version's lineage, a JSON or YAML file (base_model, base_model_digest, training_data_digest, "
            "training_code_commit, training_run_id, evaluation, tags); default: what `llmesh model build` recorded"
        ),
    ] = None,
    bootstrap: BootstrapOpt = None,
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Publish a release event (sha256 of every artifact file computed here), signed with
    LLMESH_RELEASE_HMAC_KEY or, for the local stack, with the key it made."""
    kafka_settings = release_target(bootstrap, home)
    try:
        lineage = Provenance.model_validate(yaml.safe_load(provenance.read_text())) if provenance else None
    except (OSError, ValueError, yaml.YAMLError) as err:
        err_console.print(f"--provenance {provenance}: {err}", markup=False)
        raise typer.Exit(2) from err
    event = client.release_for(
        model,
        version,
        artifacts,
        mode=mode,
        share_percent=share,
        label=label,
        author=author,
        reason=reason,
        provenance=lineage or client.build_provenance(artifacts),
    )
    asyncio.run(client.publish_release(kafka_settings, event))
    _say(f"published {event.event_id}: {model} v{version} ({mode.value})")


@release_app.command("approve")
def release_approve(
    model: str,
    version: int,
    reason: str = "",
    author: Annotated[str, typer.Option(help="the approver when the gateway requires no keys (else: the key's name)")] = "",
    wait: Annotated[float, typer.Option(help="seconds to wait until it is routed (0: do not wait)")] = 30.0,
    gateway: Annotated[Optional[str], typer.Option(help="gateway host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Approve a release that waits for approval (an `approve` key in LLMESH_API_KEY when keys are on)."""
    stub = _gateway(home, gateway)
    before = stub.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).pending
    _decide(home, gateway, "Approve", gateway_pb2.ApprovalRequest(model=model, version=version, reason=reason, author=author))
    started = time.perf_counter()
    while wait and time.perf_counter() - started < wait:
        pending = stub.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).pending
        if pending.version != version:
            _say(f"{model} v{version} is approved and routed ({time.perf_counter() - started:.2f}s)")
            return
        if len(pending.approvals) > len(before.approvals):
            _say(f"{model} v{version} has {len(pending.approvals)} of {pending.needed} approvals")
            return
        time.sleep(0.02)
    if wait:
        err_console.print(f"the approval of {model} v{version} did not apply in {wait:.0f}s: see llmesh audit --model {model}")
        raise typer.Exit(1)


@release_app.command("reject")
def release_reject(
    model: str,
    version: int,
    reason: str = "",
    author: Annotated[str, typer.Option(help="who rejects when the gateway requires no keys (else: the key's name)")] = "",
    gateway: Annotated[Optional[str], typer.Option(help="gateway host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Reject a release that waits for approval: it is never routed, and unloaded."""
    _decide(home, gateway, "Reject", gateway_pb2.ApprovalRequest(model=model, version=version, reason=reason, author=author))


def _decide(home: Path, gateway: str | None, method: str, request: gateway_pb2.ApprovalRequest) -> None:
    try:
        reply = getattr(_admin(home, gateway), method)(request, timeout=10)
    except grpc.RpcError as err:
        err_console.print(f"[red]{err.code().name}[/]: {escape(err.details() or '')}")
        raise typer.Exit(1) from err
    _say(f"published {method.lower()} {reply.event_id}: {request.model} v{request.version}")


@app.command()
def rollback(
    model: Annotated[str, typer.Option()],
    version: Annotated[int, typer.Option(help="target version (default: the previous one)")] = 0,
    reason: str = "",
    author: str = "",
    wait: Annotated[float, typer.Option(help="seconds to wait for the switch (0: do not wait)")] = 30.0,
    gateway: Annotated[Optional[str], typer.Option(help="gateway host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Route a model back to its previous version (through the gateway's Admin API)."""
    request = gateway_pb2.RollbackRequest(model=model, version=version, reason=reason, author=author)
    started = time.perf_counter()
    try:
        reply = _admin(home, gateway).Rollback(request, timeout=10)
    except grpc.RpcError as err:
        err_console.print(f"[red]{err.code().name}[/]: {err.details()}")
        raise typer.Exit(1) from err
    _say(f"published rollback {reply.event_id}: {model} -> v{reply.version}")
    stub = _gateway(home, gateway)
    while wait and time.perf_counter() - started < wait:
        if stub.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).primary_version == reply.version:
            _say(f"{model} serves v{reply.version} ({time.perf_counter() - started:.2f}s)")
            return
        time.sleep(0.02)
    if wait:
        err_console.print(f"{model} does not serve v{reply.version} after {wait:.0f}s: see llmesh models")
        raise typer.Exit(1)


@app.command()
def health(address: Annotated[str, typer.Argument(help="host:port of a service's gRPC server")] = "127.0.0.1:50051") -> None:
    """gRPC health of one service; exit 0 only when SERVING (container health checks)."""
    state = client.health_status(address)
    console.print(state)
    if state != "SERVING":
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context, service: Annotated[str, typer.Argument(help="gateway, tokenize, infer or eval")]) -> None:
    """Run one service in the foreground (settings from flags and LLMESH_* variables)."""
    if service not in SERVICES:
        err_console.print(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
        raise typer.Exit(2)
    if missing := _missing_requirements(service):  # a core-only install runs gateway and tokenize
        err_console.print(f"{service} needs {', '.join(missing)}: pip install 'llmesh[{service}]'", markup=False)
        raise typer.Exit(2)
    raise typer.Exit(importlib.import_module(f"services.{service}.app").main(ctx.args))


def _missing_requirements(extra: str) -> list[str]:
    """The packages of llmesh's optional dependencies `extra` that are not installed."""
    wanted = [r for r in metadata.requires("llmesh") or [] if f'extra == "{extra}"' in r]
    missing = []
    for requirement in wanted:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def main() -> None:
    app()


if __name__ == "__main__":
    main()
