"""What the CLI commands that work on the mesh's Redis directly (`keys`, `audit`) share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from llmesh.stack.layout import StackLayout

RedisOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(envvar="LLMESH_REDIS_URL", help="Redis of the mesh (default: the local stack's)"),
]
HomeOpt = Annotated[Path, typer.Option(envvar="LLMESH_HOME", help="the embedded stack's folder")]


def redis_url_of(redis_url: str | None, home: Path) -> str:
    """`redis_url`, else the Redis of the embedded stack in `home` (exit 2 when there is none)."""
    if redis_url is not None:
        return redis_url
    layout = StackLayout.load(home.resolve())
    if layout is None:
        Console().print(f"no stack in {home} and no --redis-url")
        raise typer.Exit(2)
    return layout.redis_url
