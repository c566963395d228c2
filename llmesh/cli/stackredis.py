"""What the CLI commands that reach the mesh's Redis or Kafka directly (`keys`, `audit`, releases) share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from llmesh.common.settings import KafkaSettings, kafka_from_env
from llmesh.stack.layout import StackLayout

RedisOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(envvar="LLMESH_REDIS_URL", help="Redis of the mesh (default: the local stack's)"),
]
HomeOpt = Annotated[Path, typer.Option(envvar="LLMESH_HOME", help="the embedded stack's folder")]
BootstrapOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Kafka bootstrap (default: the local stack); TLS and SASL from LLMESH_KAFKA__*"),
]


def redis_url_of(redis_url: str | None, home: Path) -> str:
    """`redis_url`, else the Redis of the embedded stack in `home` (exit 2 when there is none)."""
    if redis_url is not None:
        return redis_url
    layout = StackLayout.load(home.resolve())
    if layout is None:
        Console().print(f"no stack in {home} and no --redis-url")
        raise typer.Exit(2)
    return layout.redis_url


def release_target(bootstrap: str | None, home: Path) -> KafkaSettings:
    """Where release events go: `bootstrap` (TLS and SASL from LLMESH_KAFKA__*), else the local
    stack's broker, whose release key then signs them unless LLMESH_RELEASE_HMAC_KEY is set."""
    if bootstrap is not None:
        try:
            return kafka_from_env(bootstrap)
        except ValidationError as err:
            Console(stderr=True).print(f"LLMESH_KAFKA__* settings are not valid: {err}", markup=False)
            raise typer.Exit(2) from err
    layout = StackLayout.load(home.resolve())
    if layout is None:
        Console(stderr=True).print(f"no stack in {home}: run llmesh up, or pass --bootstrap")
        raise typer.Exit(2)
    os.environ.setdefault("LLMESH_RELEASE_HMAC_KEY", layout.release_key())
    return KafkaSettings(bootstrap=layout.address("broker"))  # the embedded broker: plaintext
