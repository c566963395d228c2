"""The audit trail: who did what to which model version, when, from where and why.

Every entry is appended to one Redis list, chained by digest: each entry carries the digest of the
one before it, and its own digest covers its fields and that link. The head (`llmesh:audit:head`:
how many entries, the last digest) moves in the same transaction, so `verify` finds an entry that
was edited, removed (in the middle or at the end), reordered or inserted.

Appends are idempotent by entry id: a writer that retries, or applies a replayed event, adds
nothing twice. Writers are the services and the CLI, each with its own Redis connection; the
optimistic transaction (WATCH the head) serialises them.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from enum import StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field
from redis import exceptions

from llmesh.v1 import events_pb2

LOG_KEY = "llmesh:audit:log"  # list of AuditEntry JSON, oldest first
HEAD_KEY = "llmesh:audit:head"  # {"count": n, "digest": the last entry's digest}
IDS_KEY = "llmesh:audit:ids"  # set of entry ids appended
EXPORTED_KEY = "llmesh:audit:exported"  # how many entries (from the oldest) are on the audit topic
GENESIS = "0" * 64  # what the first entry's `previous` is


class AuditAction(StrEnum):
    RELEASE_APPLIED = "release.applied"  # a release event changed the desired state (its mode in `details`)
    RELEASE_REFUSED = "release.refused"  # ... or was refused (dead-lettered), with the reason
    RELEASE_PENDING = "release.pending"  # a release event was applied but its routing waits for approval
    RELEASE_REQUESTED = "release.requested"  # the Admin API published a release event for its caller
    APPROVAL_REQUESTED = "approval.requested"  # the Admin API published an approve event for its caller
    REJECTION_REQUESTED = "rejection.requested"  # ... or a reject event
    APPROVAL_EXPIRED = "approval.expired"  # eval rejected a pending release nobody approved in time
    ROLLBACK_REQUESTED = "rollback.requested"
    POLICY_DECISION = "policy.decision"  # eval's promotion policy decided (promote, reject, rollback)
    KEY_CREATED = "key.created"
    KEY_REVOKED = "key.revoked"


class AuditSource(StrEnum):
    CLI = "cli"
    ADMIN_API = "admin-api"
    KAFKA = "kafka"  # a release event read from the release topic
    EVAL_POLICY = "eval-policy"


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=160)
    at: float = Field(default_factory=time.time)
    action: AuditAction
    source: AuditSource
    actor: str = Field(default="", max_length=256)  # who: a key's name, an event's author
    actor_key_id: str = Field(default="", max_length=128)  # the API key that called, when one did
    model: str = Field(default="", max_length=128)
    version: int = 0
    reason: str = Field(default="", max_length=2048)
    event_id: str = Field(default="", max_length=128)  # the release event, when there is one
    offset: int = -1  # its place in the release topic
    details: dict[str, str] = Field(default_factory=dict)
    previous: str = ""  # set by append: the digest of the entry before
    digest: str = ""  # set by append: sha256 over every other field

    def to_proto(self) -> events_pb2.AuditRecord:
        return events_pb2.AuditRecord(**self.model_dump(mode="json"))

    def chained(self, previous: str) -> AuditEntry:
        linked = self.model_copy(update={"previous": previous, "digest": ""})
        return linked.model_copy(update={"digest": linked.computed_digest()})

    def computed_digest(self) -> str:
        fields = self.model_dump(mode="json", exclude={"digest"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Head(BaseModel):
    count: int = 0
    digest: str = GENESIS


def verify(entries: Sequence[AuditEntry], head: Head) -> list[str]:
    """What is wrong with the trail (empty when it is intact)."""
    problems = []
    previous = GENESIS
    for n, entry in enumerate(entries):
        if entry.previous != previous:
            problems.append(f"entry {n} ({entry.id}) does not follow the one before it: an entry was removed, inserted or moved")
        if entry.computed_digest() != entry.digest:
            problems.append(f"entry {n} ({entry.id}) was changed after it was written")
        previous = entry.digest
    if (head.count, head.digest) != (len(entries), previous):
        problems.append(f"the trail holds {len(entries)} entries; its head says {head.count}: entries were removed or added")
    return problems


class AuditTrail:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def append(self, entry: AuditEntry) -> AuditEntry | None:
        """Chain `entry` after the last one; None when an entry with its id is there already."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(HEAD_KEY)
                    if await pipe.sismember(IDS_KEY, entry.id):
                        return None
                    head = await _head(pipe)
                    linked = entry.chained(head.digest)
                    pipe.multi()
                    pipe.rpush(LOG_KEY, linked.model_dump_json())
                    pipe.sadd(IDS_KEY, entry.id)
                    pipe.set(HEAD_KEY, Head(count=head.count + 1, digest=linked.digest).model_dump_json())
                    await pipe.execute()
                    return linked
                except exceptions.WatchError:
                    continue  # another writer appended meanwhile: chain after theirs

    async def entries(self, model: str = "", since: float = 0.0) -> list[AuditEntry]:
        """Every entry, oldest first (of `model`, at or after `since` when given)."""
        every = [AuditEntry.model_validate_json(raw) for raw in await self.redis.lrange(LOG_KEY, 0, -1)]
        return [e for e in every if (not model or e.model == model) and e.at >= since]

    async def verify(self) -> list[str]:
        return verify(await self.entries(), await _head(self.redis))

    async def slice(self, start: int, limit: int) -> list[AuditEntry]:
        """Up to `limit` entries from the `start`th (0: the oldest), in chain order."""
        raw = await self.redis.lrange(LOG_KEY, start, start + limit - 1)
        return [AuditEntry.model_validate_json(r) for r in raw]

    async def unexported(self, limit: int = 500) -> tuple[int, list[AuditEntry]]:
        """(the count exported so far, the next entries to export, in chain order)."""
        done = int(await self.redis.get(EXPORTED_KEY) or 0)
        return done, await self.slice(done, limit)

    async def mark_exported(self, before: int, count: int) -> None:
        """Move the export cursor from `before` by `count`, unless another exporter moved it meanwhile."""
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(EXPORTED_KEY)
                if int(await pipe.get(EXPORTED_KEY) or 0) == before:
                    pipe.multi()
                    pipe.set(EXPORTED_KEY, before + count)
                    await pipe.execute()
            except exceptions.WatchError:
                pass  # the other exporter's move stands; it published the same entries (at least once)


async def _head(client: redis.Redis | redis.client.Pipeline) -> Head:
    raw = await client.get(HEAD_KEY)
    return Head.model_validate_json(raw) if raw else Head()
