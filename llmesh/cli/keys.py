"""`llmesh keys`: API keys for the mesh's gRPC services (stored hashed in Redis)."""

from __future__ import annotations

import asyncio
import getpass
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from llmesh.cli.stackredis import HomeOpt, RedisOpt, redis_url_of
from llmesh.common.apikeys import ApiKey, ApiKeyStore, Scope, Usage
from llmesh.common.audit import AuditAction, AuditEntry, AuditSource, AuditTrail

app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
T = TypeVar("T")


def _run(redis_url: str | None, home: Path, work: Callable[[ApiKeyStore], Awaitable[T]]) -> T:
    url = redis_url_of(redis_url, home)

    async def run() -> T:
        store = ApiKeyStore.from_url(url)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


async def _audit(store: ApiKeyStore, action: AuditAction, key: ApiKey, reason: str) -> None:
    """Keys are made and revoked with Redis access, not through an API: the actor is the OS user."""
    entry = AuditEntry(
        action=action,
        source=AuditSource.CLI,
        actor=getpass.getuser(),
        reason=reason,
        details={"key_id": key.id, "key_name": key.name},
    )
    await AuditTrail(store.redis).append(entry)


@app.command()
def create(
    name: Annotated[str, typer.Option(help="who or what the key is for")],
    scope: Annotated[list[Scope], typer.Option(help="generate, read, admin and/or approve")] = [Scope.GENERATE],  # noqa: B006
    rps: Annotated[float, typer.Option(min=0, help="requests per second (0: no limit)")] = 0.0,
    tokens_per_minute: Annotated[int, typer.Option(min=0, help="prompt + completion tokens per minute (0: no limit)")] = 0,
    redis_url: RedisOpt = None,
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Make a key; its secret is printed once (send it as `x-api-key` or `authorization: Bearer`)."""

    async def work(store: ApiKeyStore) -> tuple[ApiKey, str]:
        key, secret = await store.create(name, scope, rps, tokens_per_minute)
        await _audit(store, AuditAction.KEY_CREATED, key, f"scopes {','.join(key.scopes)}")
        return key, secret

    key, secret = _run(redis_url, home, work)
    console.print(f"key {key.id} ({', '.join(key.scopes)}) for {name}")
    print(secret)


@app.command("list")
def list_keys(redis_url: RedisOpt = None, home: HomeOpt = Path(".llmesh")) -> None:
    """Every key with its scopes, limits, state and tokens used."""

    async def work(store: ApiKeyStore) -> list[tuple[ApiKey, Usage]]:
        return [(key, await store.usage(key.id)) for key in await store.list()]

    table = Table("id", "name", "scopes", "req/s", "tokens/min", "created", "state", "requests", "tokens in/out")
    for key, usage in _run(redis_url, home, work):
        state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.localtime(key.revoked_at))}" if key.revoked_at else "live"
        table.add_row(
            key.id,
            key.name,
            ",".join(key.scopes),
            f"{key.requests_per_second:g}" if key.requests_per_second else "-",
            str(key.tokens_per_minute or "-"),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at)),
            state,
            str(usage.requests),
            f"{usage.prompt_tokens}/{usage.completion_tokens}",
        )
    console.print(table)


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (from list)")],
    redis_url: RedisOpt = None,
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Revoke a key: gateways refuse it within seconds."""

    async def work(store: ApiKeyStore) -> ApiKey | None:
        key = await store.revoke(key_id)
        if key is not None:
            await _audit(store, AuditAction.KEY_REVOKED, key, "revoked")
        return key

    key = _run(redis_url, home, work)
    if key is None:
        console.print(f"no key {key_id}")
        raise typer.Exit(1)
    console.print(f"key {key.id} ({key.name}) revoked")
