"""The model registry and routing table in Redis. Every key the mesh uses is named here.

Keys:
  llmesh:models                            set of model names
  llmesh:model:{name}:routing              hash: primary, previous, candidate, candidate_mode, candidate_share, updated_at
  llmesh:model:{name}:versions             hash: version -> JSON VersionRecord
  llmesh:model:{name}:history              list of JSON history entries (newest last)
  llmesh:model:{name}:tokenizers:{version} set of replicas (gateway, tokenize) that hold the version's tokenizer
  llmesh:event:{event_id}                  the release-topic offset where the event was accepted
  llmesh:events:refused                    set of "{event_id}@{offset}" already refused (not refused twice on replay)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import redis.asyncio as redis
from pydantic import BaseModel, Field
from redis import exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.typing import EncodableT, FieldT

from llmesh.v1 import common_pb2

PREFIX = "llmesh"
MODELS = f"{PREFIX}:models"
REFUSED_EVENTS = f"{PREFIX}:events:refused"
LIVE_STATES = ("SERVING", "READY", "DRAINING")  # loaded in Triton: requests pinned to them are answered


def connect(url: str) -> redis.Redis:
    """A client that reconnects once Redis is back: a command on a connection Redis closed (it
    restarted) is retried on a fresh one instead of failing."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)
    return redis.Redis.from_url(
        url, decode_responses=True, retry=retry, retry_on_error=[exceptions.ConnectionError, exceptions.TimeoutError]
    )


def routing_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:routing"


def versions_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:versions"


def history_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:history"


def tokenizers_key(model: str, version: int) -> str:
    return f"{PREFIX}:model:{model}:tokenizers:{version}"


def event_key(event_id: str) -> str:
    return f"{PREFIX}:event:{event_id}"


# Make `version` the primary and remember the one it replaces, in one step.
_ROUTE_TO = """
local old = redis.call('HGET', KEYS[1], 'primary')
if old and old ~= ARGV[1] then redis.call('HSET', KEYS[1], 'previous', old) end
redis.call('HSET', KEYS[1], 'primary', ARGV[1], 'updated_at', ARGV[2])
return old
"""


class VersionRecord(BaseModel):
    version: int
    state: str = "STAGED"  # a VersionState name without its prefix
    label: str = ""
    artifact_uri: str = ""
    sha256: dict[str, str] = Field(default_factory=dict)
    event_id: str = ""
    reason: str = ""
    updated_at: float = 0.0

    def state_enum(self) -> common_pb2.VersionState.ValueType:
        return common_pb2.VersionState.Value(f"VERSION_STATE_{self.state}")


class HistoryEntry(BaseModel):
    at: float
    version: int
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Route:
    model: str
    version: int


@dataclass(frozen=True)
class Routing:
    primary: int = 0
    previous: int = 0
    candidate: int = 0
    candidate_mode: str = ""  # "shadow" (mirrored, never answers clients) or "canary" (answers a share)
    candidate_share: int = 0  # percent of requests mirrored (shadow) or served (canary)
    updated_at: float = 0.0

    def needed(self) -> set[int]:
        """Versions that must stay loaded: primary, previous (instant rollback) and candidate."""
        return {v for v in (self.primary, self.previous, self.candidate) if v}


class EventClaim(Enum):
    NEW = "new"  # first time this event id is seen: apply it
    REPLAY = "replay"  # the same message read again (a restart): already applied
    DUPLICATE = "duplicate"  # another message with an event id already applied: refuse


class Registry:
    """Reads and writes model versions, routing and event bookkeeping."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._route_to = client.register_script(_ROUTE_TO)

    @classmethod
    def from_url(cls, url: str) -> Registry:
        return cls(connect(url))

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

    async def routing(self, model: str) -> Routing:
        raw = await self.redis.hgetall(routing_key(model))
        return Routing(
            primary=int(raw.get("primary", 0)),
            previous=int(raw.get("previous", 0)),
            candidate=int(raw.get("candidate", 0)),
            candidate_mode=str(raw.get("candidate_mode", "")),
            candidate_share=int(raw.get("candidate_share", 0)),
            updated_at=float(raw.get("updated_at", 0)),
        )

    async def primary(self, model: str) -> int:
        return (await self.routing(model)).primary

    async def set_state(self, model: str, record: VersionRecord) -> None:
        record.updated_at = time.time()
        entry = HistoryEntry(at=record.updated_at, version=record.version, state=record.state, reason=record.reason)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(MODELS, model)
            pipe.hset(versions_key(model), str(record.version), record.model_dump_json())
            pipe.rpush(history_key(model), entry.model_dump_json())
            await pipe.execute()

    async def note(self, model: str, version: int, state: str, reason: str) -> None:
        """Add a history entry without changing the version's state (e.g. a policy decision)."""
        entry = HistoryEntry(at=time.time(), version=version, state=state, reason=reason)
        await self.redis.rpush(history_key(model), entry.model_dump_json())

    async def history(self, model: str) -> list[HistoryEntry]:
        return [HistoryEntry.model_validate_json(e) for e in await self.redis.lrange(history_key(model), 0, -1)]

    async def route_to(self, model: str, version: int) -> int:
        """Make `version` the primary atomically; returns the version it replaced (0 if none)."""
        old = await self._route_to(keys=[routing_key(model)], args=[str(version), str(time.time())])
        return int(old) if old else 0

    async def set_candidate(self, model: str, version: int, mode: str, share: int) -> None:
        mapping: dict[FieldT, EncodableT] = {
            "candidate": version,
            "candidate_mode": mode,
            "candidate_share": share,
            "updated_at": time.time(),
        }
        await self.redis.hset(routing_key(model), mapping=mapping)

    async def clear_candidate(self, model: str) -> None:
        await self.redis.hdel(routing_key(model), "candidate", "candidate_mode", "candidate_share")

    async def resolve(self, alias: str) -> Route | None:
        """`name` -> the primary version; `name@N` -> version N if it is loaded."""
        name, _, pinned = alias.partition("@")
        if pinned:
            if not pinned.isdigit():
                return None
            record = await self.version(name, int(pinned))
            return Route(name, int(pinned)) if record is not None and record.state in LIVE_STATES else None
        primary = await self.primary(name)
        return Route(name, primary) if primary else None

    # ---- release-event bookkeeping -------------------------------------------------------------

    async def claim_event(self, event_id: str, offset: int) -> EventClaim:
        if await self.redis.set(event_key(event_id), str(offset), nx=True):
            return EventClaim.NEW
        return EventClaim.REPLAY if await self.redis.get(event_key(event_id)) == str(offset) else EventClaim.DUPLICATE

    async def release_claim(self, event_id: str) -> None:
        """Forget a claim whose event was refused, so that a corrected event may reuse the id."""
        await self.redis.delete(event_key(event_id))

    async def was_refused(self, event_id: str, offset: int) -> bool:
        return bool(await self.redis.sismember(REFUSED_EVENTS, f"{event_id}@{offset}"))

    async def mark_refused(self, event_id: str, offset: int) -> bool:
        """Record a refusal; False if this very message was refused before (a replay)."""
        return bool(await self.redis.sadd(REFUSED_EVENTS, f"{event_id}@{offset}"))

    # ---- tokenizers ------------------------------------------------------------------------------

    async def mark_tokenizer_loaded(self, model: str, version: int, replica: str) -> None:
        await self.redis.sadd(tokenizers_key(model, version), replica)

    async def tokenizer_replicas(self, model: str, version: int) -> int:
        return int(await self.redis.scard(tokenizers_key(model, version)))
