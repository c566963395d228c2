"""`llmesh audit`: who did what to which model version, and whether the trail is intact."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, TypeVar

import redis.asyncio as redis
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmesh.cli.stackredis import HomeOpt, RedisOpt, redis_url_of
from llmesh.common.audit import AuditTrail

app = typer.Typer(
    help="The audit trail: releases, rollbacks, policy decisions, keys.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)
console = Console()
T = TypeVar("T")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _run(redis_url: str | None, home: Path, work: Callable[[AuditTrail], Awaitable[T]]) -> T:
    url = redis_url_of(redis_url, home)

    async def run() -> T:
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            return await work(AuditTrail(client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def since_time(text: str, now: float) -> float:
    """Unix seconds of `text`: a duration back from now (`90s`, `30m`, `2h`, `7d`) or an ISO 8601 time."""
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip()):
        return now - float(match[1]) * UNITS[match[2]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as err:
        raise typer.BadParameter(f"{text!r} is neither a duration (30m, 2h, 7d) nor an ISO 8601 time") from err


@app.callback()
def show(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="only this model's entries")] = "",
    since: Annotated[str, typer.Option(help="only entries since: a duration back (30m, 2h, 7d) or an ISO 8601 time")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line, every field")] = False,
    redis_url: RedisOpt = None,
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Every entry, oldest first: when, what, which version, who (the API key, or the event's author), from where, why."""
    if ctx.invoked_subcommand is not None:
        return
    start = since_time(since, time.time()) if since else 0.0
    entries = _run(redis_url, home, lambda trail: trail.entries(model, start))
    if as_json:
        for entry in entries:
            print(entry.model_dump_json())
        return
    table = Table("time", "action", "model", "version", "actor", "source", "reason")
    for e in entries:
        actor = f"{e.actor} ({e.actor_key_id})" if e.actor_key_id else e.actor
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at)),
            e.action.value,
            escape(e.model),
            str(e.version or ""),
            escape(actor),
            e.source.value,
            escape(e.reason),
        )
    console.print(table)


@app.command()
def verify(redis_url: RedisOpt = None, home: HomeOpt = Path(".llmesh")) -> None:
    """Check the chain of digests: exit 1 when an entry was edited, removed, moved or inserted."""

    async def work(trail: AuditTrail) -> tuple[int, list[str]]:
        return len(await trail.entries()), await trail.verify()

    count, problems = _run(redis_url, home, work)
    for problem in problems:
        console.print(f"[red]broken[/]: {escape(problem)}")
    if problems:
        raise typer.Exit(1)
    console.print(json.dumps({"entries": count, "intact": True}))
