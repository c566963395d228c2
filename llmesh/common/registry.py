"""The model registry and routing table in Redis. Every key the mesh uses is named here.

Keys:
  llmesh:models                       set of model names
  llmesh:model:{name}:routing         hash: primary (version), previous (version), updated_at
  llmesh:model:{name}:versions        hash: version -> JSON VersionRecord
  llmesh:model:{name}:history         list of JSON history entries (newest last)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as redis
from pydantic import BaseModel
from redis.typing import EncodableT, FieldT

from llmesh.v1 import common_pb2

PREFIX = "llmesh"
MODELS = f"{PREFIX}:models"


def routing_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:routing"


def versions_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:versions"


def history_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:history"


class VersionRecord(BaseModel):
    version: int
    state: str = "STAGED"  # a VersionState name without its prefix
    label: str = ""
    artifact_uri: str = ""
    reason: str = ""
    updated_at: float = 0.0

    def state_enum(self) -> common_pb2.VersionState.ValueType:
        return common_pb2.VersionState.Value(f"VERSION_STATE_{self.state}")


@dataclass(frozen=True)
class Route:
    model: str
    version: int


class Registry:
    """Reads and writes model versions and routing."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @classmethod
    def from_url(cls, url: str) -> Registry:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    async def close(self) -> None:
        await self.redis.aclose()

    async def models(self) -> list[str]:
        return sorted(str(m) for m in await self.redis.smembers(MODELS))

    async def versions(self, model: str) -> list[VersionRecord]:
        raw = await self.redis.hgetall(versions_key(model))
        return sorted((VersionRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.version)

    async def version(self, model: str, version: int) -> VersionRecord | None:
        raw = await self.redis.hget(versions_key(model), str(version))
        return VersionRecord.model_validate_json(raw) if raw else None

    async def primary(self, model: str) -> int:
        value = await self.redis.hget(routing_key(model), "primary")
        return int(value) if value else 0

    async def set_state(self, model: str, record: VersionRecord) -> None:
        record.updated_at = time.time()
        entry = json.dumps({"at": record.updated_at, "version": record.version, "state": record.state, "reason": record.reason})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(MODELS, model)
            pipe.hset(versions_key(model), str(record.version), record.model_dump_json())
            pipe.rpush(history_key(model), entry)
            await pipe.execute()

    async def route_to(self, model: str, version: int) -> None:
        """Make `version` the primary, atomically, keeping the previous one for rollback."""
        current = await self.primary(model)
        mapping: dict[FieldT, EncodableT] = {"primary": str(version), "updated_at": str(time.time())}
        if current and current != version:
            mapping["previous"] = str(current)
        await self.redis.hset(routing_key(model), mapping=mapping)

    async def resolve(self, alias: str) -> Route | None:
        """`name` -> the primary version; `name@N` -> version N if it is serving or ready."""
        name, _, pinned = alias.partition("@")
        if pinned:
            if not pinned.isdigit():
                return None
            record = await self.version(name, int(pinned))
            ok = record is not None and record.state in ("SERVING", "READY", "DRAINING")
            return Route(name, int(pinned)) if ok else None
        primary = await self.primary(name)
        return Route(name, primary) if primary else None
