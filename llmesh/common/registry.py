"""The model registry and routing table in Redis. Every key the mesh uses is named here.

Keys:
  llmesh:models                            set of model names
  llmesh:model:{name}:desired              JSON Routing: the roles the last applied release event asks for
  llmesh:model:{name}:routing              hash: primary, previous, candidate, candidate_mode, candidate_share, updated_at,
                                           flipped_at: the roles gateways route by, once every live infer replica is ready
  llmesh:model:{name}:versions             hash: version -> JSON VersionRecord
  llmesh:model:{name}:history              list of JSON history entries (newest last)
  llmesh:tokenizer:{digest}                hash: tokenizer.json, config.json and, when the version has one,
                                           tokenizer_config.json of a stored version (checked by sha256 on read)
  llmesh:tokenizer:{digest}:holders        set of replicas (gateway, tokenize) that hold the version's tokenizer
  llmesh:event:{event_id}                  "{offset} applied", or "{offset} applying {replica}" while one replica applies it
  llmesh:events:refused                    set of "{event_id}@{offset}" already refused (not refused twice on replay)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum, StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, Field
from redis import exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.typing import EncodableT, FieldT

from llmesh.common.approval import PendingApproval
from llmesh.common.events import Provenance
from llmesh.common.validation import InvalidRequest, parse_model_ref
from llmesh.v1 import common_pb2

PREFIX = "llmesh"
MODELS = f"{PREFIX}:models"
REFUSED_EVENTS = f"{PREFIX}:events:refused"
TOKENIZER_FILES = ("tokenizer.json", "config.json")
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json",)  # the chat template and special tokens, when a version has them


def tokenizer_file_names(sha256: Mapping[str, str]) -> tuple[str, ...]:
    """The tokenizer files of a version whose artifacts have these sha256: the required ones and the
    optional ones it has (every file of a release is in its sha256, so none can be left out unseen)."""
    return TOKENIZER_FILES + tuple(name for name in OPTIONAL_TOKENIZER_FILES if name in sha256)


class VersionState(StrEnum):
    STAGED = "STAGED"
    LOADING = "LOADING"
    READY = "READY"
    SERVING = "SERVING"
    DRAINING = "DRAINING"
    RETIRED = "RETIRED"
    FAILED = "FAILED"
    PENDING_APPROVAL = "PENDING_APPROVAL"  # loaded everywhere, routed to nobody until approved


LIVE_STATES = (VersionState.SERVING, VersionState.READY, VersionState.DRAINING)  # requests pinned to them are answered


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


def desired_key(model: str) -> str:
    return f"{PREFIX}:model:{model}:desired"


def tokenizer_key(digest: str) -> str:
    return f"{PREFIX}:tokenizer:{digest}"


def holders_key(digest: str) -> str:
    return f"{PREFIX}:tokenizer:{digest}:holders"


def event_key(event_id: str) -> str:
    return f"{PREFIX}:event:{event_id}"


# Make ARGV[1] the primary if the primary is still ARGV[3] ('' for none), remembering the one it
# replaces: of several replicas flipping at once, exactly one wins.
_FLIP_PRIMARY = """
local old = redis.call('HGET', KEYS[1], 'primary') or ''
if old ~= ARGV[3] then return 0 end
if old ~= '' and old ~= ARGV[1] then redis.call('HSET', KEYS[1], 'previous', old) end
redis.call('HSET', KEYS[1], 'primary', ARGV[1], 'updated_at', ARGV[2], 'flipped_at', ARGV[2])
return 1
"""
# Set (or with ARGV[1] '' clear) the candidate; 0 when it was so already.
_SET_CANDIDATE = """
local cur = redis.call('HMGET', KEYS[1], 'candidate', 'candidate_mode', 'candidate_share')
if ARGV[1] == '' then
  if not cur[1] then return 0 end
  redis.call('HDEL', KEYS[1], 'candidate', 'candidate_mode', 'candidate_share')
else
  if cur[1] == ARGV[1] and cur[2] == ARGV[2] and cur[3] == ARGV[3] then return 0 end
  redis.call('HSET', KEYS[1], 'candidate', ARGV[1], 'candidate_mode', ARGV[2], 'candidate_share', ARGV[3])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
return 1
"""
# Renew a claim while it is being applied; never an event applied already (that mark never expires).
_HOLD_CLAIM = """
if string.find(redis.call('GET', KEYS[1]) or '', ' applying ', 1, true) then
  return redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
"""
# Claim an event for this replica: NEW, or what holds it ("{offset} applied" / "{offset} applying {replica}").
_CLAIM_EVENT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'new' end
return redis.call('GET', KEYS[1]) or 'gone'
"""


class VersionRecord(BaseModel):
    version: int
    state: VersionState = VersionState.STAGED
    label: str = ""
    artifact_uri: str = ""  # where the operator's release found the artifacts (provenance; never read again)
    sha256: dict[str, str] = Field(default_factory=dict)
    digest: str = ""  # content digest of `sha256`: the version's folder in the model store
    event_id: str = ""
    author: str = ""
    reason: str = ""
    updated_at: float = 0.0
    provenance: Provenance | None = None

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
    flipped_at: float = 0.0  # the last change of primary
    event_version: int = 0  # desired state only: the version the last applied event named ...
    reason: str = ""  # ... and the reason it gave (recorded with that version's next state)
    pending: PendingApproval | None = None  # desired state only: a release that waits for approval

    def pending_version(self) -> int:
        return self.pending.version if self.pending else 0

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str) -> Routing:
        data = json.loads(raw)
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        pending = fields.pop("pending", None)
        return cls(**fields, pending=PendingApproval.loads(pending) if pending else None)


class EventClaim(Enum):
    NEW = "new"  # first time this event id is seen: apply it
    REPLAY = "replay"  # the same message read again (a restart, another replica): already applied
    APPLYING = "applying"  # another replica is applying this very message now: wait for it
    DUPLICATE = "duplicate"  # another message with an event id already applied: refuse


class Registry:
    """Reads and writes model versions, routing and event bookkeeping."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._flip_primary = client.register_script(_FLIP_PRIMARY)
        self._set_candidate = client.register_script(_SET_CANDIDATE)
        self._claim_event = client.register_script(_CLAIM_EVENT)
        self._hold_claim = client.register_script(_HOLD_CLAIM)

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
            flipped_at=float(raw.get("flipped_at", 0)),
        )

    async def desired(self, model: str) -> Routing:
        """The roles the release events ask for (the routing itself until an event set them)."""
        raw = await self.redis.get(desired_key(model))
        return Routing.loads(str(raw)) if raw else await self.routing(model)

    async def commit(self, model: str, desired: Routing, event_id: str, offset: int) -> None:
        """Write the desired roles of `model` and mark the event that set them applied, in one step:
        a replica that dies before has applied nothing, one that dies after has applied it all."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(MODELS, model)
            pipe.set(desired_key(model), desired.dumps())
            pipe.set(event_key(event_id), f"{offset} applied")
            await pipe.execute()

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

    async def flip_primary(self, model: str, version: int, expected: int) -> bool:
        """Route `model` to `version` if its primary is still `expected`; True for the one flip that did it."""
        args = [str(version), str(time.time()), str(expected) if expected else ""]
        return bool(await self._flip_primary(keys=[routing_key(model)], args=args))

    async def set_candidate(self, model: str, version: int, mode: str, share: int) -> bool:
        """Route a share to candidate `version` (0: none); True if that changed the routing."""
        args = [str(version) if version else "", mode, str(share), str(time.time())]
        return bool(await self._set_candidate(keys=[routing_key(model)], args=args))

    async def resolve(self, alias: str) -> Route | None:
        """`name` -> the primary version; `name@N` -> version N if it is loaded; None for what is
        not served, a malformed reference included (parse_model_ref says why)."""
        try:
            name, pinned = parse_model_ref(alias)
        except InvalidRequest:
            return None
        if pinned is not None:
            record = await self.version(name, pinned)
            return Route(name, pinned) if record is not None and record.state in LIVE_STATES else None
        primary = await self.primary(name)
        return Route(name, primary) if primary else None

    # ---- release-event bookkeeping -------------------------------------------------------------

    async def claim_event(self, event_id: str, offset: int, replica: str, hold_s: float) -> EventClaim:
        """Claim the event at `offset` for `replica` to apply it (the claim lapses after `hold_s`
        should the replica die meanwhile)."""
        held = str(await self._claim_event(keys=[event_key(event_id)], args=[f"{offset} applying {replica}", int(hold_s * 1000)]))
        if held == "new":
            return EventClaim.NEW
        at, _, how = held.partition(" ")
        if at != str(offset):
            return EventClaim.DUPLICATE
        return EventClaim.REPLAY if how == "applied" else EventClaim.APPLYING

    async def hold_claim(self, event_id: str, hold_s: float) -> None:
        """Keep this replica's claim while it applies the event (it lapses if the replica dies)."""
        await self._hold_claim(keys=[event_key(event_id)], args=[int(hold_s * 1000)])

    async def release_claim(self, event_id: str) -> None:
        """Forget a claim whose event was refused, so that a corrected event may reuse the id."""
        await self.redis.delete(event_key(event_id))

    async def was_refused(self, event_id: str, offset: int) -> bool:
        return bool(await self.redis.sismember(REFUSED_EVENTS, f"{event_id}@{offset}"))

    async def mark_refused(self, event_id: str, offset: int) -> bool:
        """Record a refusal; False if this very message was refused before (a replay)."""
        return bool(await self.redis.sadd(REFUSED_EVENTS, f"{event_id}@{offset}"))

    # ---- tokenizers ------------------------------------------------------------------------------

    async def put_tokenizer(self, digest: str, files: dict[str, str]) -> None:
        """What gateways and tokenize need of a stored version, so they never read its folder."""
        mapping: dict[FieldT, EncodableT] = {name: text for name, text in files.items()}
        await self.redis.hset(tokenizer_key(digest), mapping=mapping)

    async def tokenizer_files(self, digest: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in (await self.redis.hgetall(tokenizer_key(digest))).items()}

    async def mark_tokenizer_loaded(self, digest: str, replica: str) -> None:
        await self.redis.sadd(holders_key(digest), replica)

    async def tokenizer_replicas(self, digest: str) -> int:
        return int(await self.redis.scard(holders_key(digest)))
