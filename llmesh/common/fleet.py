"""The infer fleet as Redis shows it: which replicas beat, what each is ready with, who runs a task.
Infer writes these keys (services/infer/leases.py, reconcile.py); gateways read them to answer at once
when no replica can serve a request, instead of at its deadline.

Keys:
  llmesh:infer:replicas                set of replicas that may hold leases
  llmesh:infer:replica:{replica}       heartbeat, expires when the replica stops beating
  llmesh:infer:leases:{replica}        hash: request id -> JSON lease (the task and where to answer)
  llmesh:infer:claim:{request_id}      the replica that runs the task; outlives it to refuse redeliveries
  llmesh:infer:ready:{replica}         set of "{model}@{version}@{digest}" loaded and warm on that replica
                                       (counted only while the replica's heartbeat is alive)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as redis

REPLICAS = "llmesh:infer:replicas"
HEARTBEAT_S = 1.0  # how often an infer replica beats
HEARTBEAT_TTL_S = 3.0  # a replica that has not beaten for this long is dead


def heartbeat_key(replica: str) -> str:
    return f"llmesh:infer:replica:{replica}"


def leases_key(replica: str) -> str:
    return f"llmesh:infer:leases:{replica}"


def claim_key(request_id: str) -> str:
    return f"llmesh:infer:claim:{request_id}"


def ready_key(replica: str) -> str:
    return f"llmesh:infer:ready:{replica}"


def ready_entry(model: str, version: int, digest: str) -> str:
    return f"{model}@{version}@{digest}"


@dataclass
class FleetView:
    """One reading of the fleet: live replicas and what each is ready with; the dead ones by name."""

    live: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)
    read_at: float = 0.0

    @classmethod
    async def read(cls, client: redis.Redis) -> FleetView:
        replicas = sorted(str(r) for r in await client.smembers(REPLICAS))
        beats = await client.mget([heartbeat_key(r) for r in replicas]) if replicas else []
        live = [r for r, beat in zip(replicas, beats, strict=True) if beat is not None]
        async with client.pipeline(transaction=False) as pipe:
            for replica in live:
                pipe.smembers(ready_key(replica))
            entries = await pipe.execute() if live else []
        ready = {r: {_version_of(str(e)) for e in found} for r, found in zip(live, entries, strict=True)}
        return cls(ready, [r for r in replicas if r not in ready], time.monotonic())

    def can_serve(self, model: str, version: int) -> bool:
        return any((model, version) in versions for versions in self.live.values())

    def why_not(self, model: str, version: int) -> str:
        """Why no replica can serve `model@version` (the UNAVAILABLE message)."""
        if not self.live:
            down = f" ({', '.join(self.dead[:8])} stopped beating)" if self.dead else ""
            return f"no infer replica is alive{down}; retry shortly"
        return f"none of the {len(self.live)} live infer replicas has {model}@{version} loaded; retry shortly"


def _version_of(entry: str) -> tuple[str, int]:
    model, version, _digest = entry.rsplit("@", 2)
    return model, int(version)
