"""`llmesh scenario`: release prompt templates per scenario, canary and promote them, roll back."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import grpc
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmesh import client
from llmesh.cli.stackredis import BootstrapOpt, HomeOpt, release_target
from llmesh.common.prompts import PromptRelease, ScenarioMode
from llmesh.common.validation import summarize
from llmesh.stack.layout import StackLayout
from llmesh.v1 import gateway_pb2, gateway_pb2_grpc

app = typer.Typer(
    help="Prompt templates per scenario, released on llmesh.prompts.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console()
err_console = Console(stderr=True)
GatewayOpt = Annotated[Optional[str], typer.Option(help="gateway host:port (default: the local stack)")]  # noqa: UP045


def _publish(event: PromptRelease, bootstrap: str | None, home: Path) -> None:
    target = release_target(bootstrap, home)
    key = os.environ.get("LLMESH_RELEASE_HMAC_KEY", "")
    signed = event.signed(key.encode() if key else None)
    asyncio.run(client.publish_prompt_release(target, signed))
    console.print(f"[bold cyan]llmesh[/] published {signed.event_id}: scenario {event.scenario} {event.mode.value}")


@app.command("release")
def release(
    spec: Annotated[Path, typer.Argument(help="YAML or JSON: scenario, version, template (text, params), model, sampling")],
    canary: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, max=99, help="release as a canary answering this percent of clients"),
    ] = None,
    shadow: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, max=100, help="release as a shadow: this percent of requests mirrored, scored by eval"),
    ] = None,
    author: str = "",
    reason: str = "",
    bootstrap: BootstrapOpt = None,
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Release a template version: the scenario's new primary, or a canary or shadow beside it."""
    if canary and shadow:
        err_console.print("--canary or --shadow, not both")
        raise typer.Exit(2)
    try:
        data = yaml.safe_load(spec.read_text())
        if not isinstance(data, dict):
            raise ValueError("the file must hold a mapping")
        mode = ScenarioMode.CANARY if canary else ScenarioMode.SHADOW if shadow else ScenarioMode.RELEASE
        extra = {
            "mode": mode,
            "share_percent": canary or shadow or 100,
            "author": author or data.get("author", ""),
            "reason": reason,
        }
        event = PromptRelease.model_validate(data | extra)
    except ValidationError as err:
        err_console.print(f"{spec}: {summarize(err)}", markup=False)
        raise typer.Exit(2) from err
    except (OSError, ValueError, yaml.YAMLError) as err:
        err_console.print(f"{spec}: {err}", markup=False)
        raise typer.Exit(2) from err
    _publish(event, bootstrap, home)


@app.command("promote")
def promote(
    scenario: str, reason: str = "", author: str = "", bootstrap: BootstrapOpt = None, home: HomeOpt = Path(".llmesh")
) -> None:
    """Make the scenario's candidate (canary or shadow) its primary."""
    _publish(PromptRelease(scenario=scenario, mode=ScenarioMode.PROMOTE, reason=reason, author=author), bootstrap, home)


@app.command("rollback")
def rollback(
    scenario: str, reason: str = "", author: str = "", bootstrap: BootstrapOpt = None, home: HomeOpt = Path(".llmesh")
) -> None:
    """Drop the scenario's candidate, or (without one) go back to the previous primary."""
    _publish(PromptRelease(scenario=scenario, mode=ScenarioMode.ROLLBACK, reason=reason, author=author), bootstrap, home)


@app.command("list")
def list_scenarios(gateway: GatewayOpt = None, home: HomeOpt = Path(".llmesh")) -> None:
    """The scenarios the gateways serve: template version, canary, model, parameters."""
    address = gateway
    if address is None:
        layout = StackLayout.load(home.resolve())
        if layout is None:
            err_console.print(f"no stack in {home}: run llmesh up, or pass --gateway")
            raise typer.Exit(2)
        address = layout.address("gateway")
    stub = gateway_pb2_grpc.GatewayStub(client.gateway_channel(address))
    try:
        reply = stub.ListScenarios(gateway_pb2.ListScenariosRequest(), timeout=10)
    except grpc.RpcError as err:
        err_console.print(f"[red]{err.code().name}[/]: {escape(err.details() or '')}")
        raise typer.Exit(1) from err
    table = Table("scenario", "serving", "model", "parameters", "released")
    for info in reply.scenarios:
        versions = {v.version: v for v in info.versions}
        primary = versions[info.primary_version]
        serving = f"v{info.primary_version}"
        if info.candidate_version:
            serving += f", {info.candidate_mode} v{info.candidate_version} at {info.share_percent}%"
        params = ", ".join(f"{n}: {t}" for n, t in sorted(primary.params.items()))
        released = datetime.fromtimestamp(primary.released_at).strftime("%Y-%m-%d %H:%M") if primary.released_at else ""
        table.add_row(escape(info.name), serving, escape(primary.model), escape(params), released)
    console.print(table)
