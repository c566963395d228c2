"""Requests survive the death of the infer replica running them. Each replica claims a task in Redis
before running it (a task read twice, e.g. redelivered after a rebalance, runs once) and keeps a
lease on it until its answer is out, while a heartbeat says the replica is alive. The other replicas
(or this one, restarted) take over the leases of a replica whose heartbeat stopped: a unary task is
published again for any replica to run; a stream, whose client has seen part of an answer, is
answered UNAVAILABLE.

Keys: llmesh/common/fleet.py (gateways read the heartbeats too).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as redis
from prometheus_client import Counter

from llmesh.common.fleet import HEARTBEAT_S, HEARTBEAT_TTL_S, REPLICAS, claim_key, heartbeat_key, leases_key
from llmesh.common.outages import REDIS_ERRORS
from llmesh.common.tasks import cancel
from llmesh.v1 import events_pb2

log = logging.getLogger("llmesh.infer.leases")
TAKEN_OVER = Counter(
    "llmesh_infer_taken_over_total",
    "Requests of a dead replica taken over: requeued, answered UNAVAILABLE, or expired",
    ["outcome"],
)
DUPLICATES = Counter("llmesh_infer_duplicate_tasks_total", "Tasks read again (redelivered) and not run twice")
# Claim the task for this replica and record the lease, or report that someone has claimed it.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """A running task and what is needed to answer it or run it again elsewhere."""

    task: events_pb2.InferTask
    reply_to: str
    traceparent: str

    def dumps(self) -> str:
        task = base64.b64encode(self.task.SerializeToString()).decode()
        return json.dumps({"task": task, "reply_to": self.reply_to, "traceparent": self.traceparent})

    @classmethod
    def loads(cls, raw: str) -> Lease:
        data = json.loads(raw)
        task = events_pb2.InferTask.FromString(base64.b64decode(data["task"]))
        return cls(task, data["reply_to"], data["traceparent"])


Requeue = Callable[[Lease], Awaitable[None]]  # publish the task again
Unavailable = Callable[[Lease, str], Awaitable[None]]  # answer the task UNAVAILABLE with a reason


class ReplicaLeases:
    def __init__(
        self, client: redis.Redis, replica: str, *, heartbeat_s: float = HEARTBEAT_S, ttl_s: float = HEARTBEAT_TTL_S
    ) -> None:
        self.redis, self.replica = client, replica
        self.heartbeat_s, self.ttl_s = heartbeat_s, ttl_s
        self._claim = client.register_script(_CLAIM)
        self._loop: asyncio.Task[None] | None = None

    async def start(self, requeue: Requeue, unavailable: Unavailable) -> None:
        await self._take_over(self.replica, requeue, unavailable)  # left by this replica before it started afresh
        await self._beat()
        await self.redis.sadd(REPLICAS, self.replica)
        self._loop = asyncio.create_task(self._keep_alive(requeue, unavailable))

    async def stop(self) -> None:
        """After the drain: nothing is leased any more; the heartbeat goes so no one waits for it."""
        await cancel(self._loop)
        with contextlib.suppress(redis.RedisError):
            await self.redis.delete(heartbeat_key(self.replica))
            await self.redis.srem(REPLICAS, self.replica)

    async def claim(self, lease: Lease) -> bool:
        """True if this replica now runs the task; False if it was claimed before (a redelivery)."""
        task = lease.task
        keep_ms = max(60_000, int(task.deadline_unix_ms - time.time() * 1000) + 60_000)
        keys = [claim_key(task.request_id), leases_key(self.replica)]
        try:
            claimed = bool(await self._claim(keys=keys, args=[self.replica, keep_ms, task.request_id, lease.dumps()]))
        except REDIS_ERRORS as err:  # answering matters more than surviving a second fault at once
            log.warning("running a task without a lease: Redis is unreachable", extra={"error": str(err)})
            return True
        if not claimed:
            DUPLICATES.inc()
        return claimed

    async def done(self, request_id: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.hdel(leases_key(self.replica), request_id)

    async def _beat(self) -> None:
        await self.redis.set(heartbeat_key(self.replica), str(time.time()), px=int(self.ttl_s * 1000))

    async def _keep_alive(self, requeue: Requeue, unavailable: Unavailable) -> None:
        while True:
            try:
                await self._beat()
                for dead in await self._dead_replicas():
                    await self._take_over(dead, requeue, unavailable)
            except Exception:
                log.exception("heartbeat or take-over failed")
            await asyncio.sleep(self.heartbeat_s)

    async def _dead_replicas(self) -> list[str]:
        replicas = [str(r) for r in await self.redis.smembers(REPLICAS) if r != self.replica]
        alive = await self.redis.mget([heartbeat_key(r) for r in replicas]) if replicas else []
        return [r for r, beat in zip(replicas, alive, strict=True) if beat is None]

    async def _take_over(self, dead: str, requeue: Requeue, unavailable: Unavailable) -> None:
        """Move the dead replica's leases to this replica atomically (one taker), then settle each."""
        taken = f"{leases_key(dead)}:taken-by:{self.replica}"
        try:
            await self.redis.rename(leases_key(dead), taken)
        except redis.ResponseError:  # no leases left (or another replica took them)
            await self.redis.srem(REPLICAS, dead)
            return
        leases = {str(k): str(v) for k, v in (await self.redis.hgetall(taken)).items()}
        log.warning("taking over the requests of a dead replica", extra={"dead": dead, "requests": len(leases)})
        for request_id, raw in leases.items():
            lease = Lease.loads(raw)
            if lease.task.deadline_unix_ms and lease.task.deadline_unix_ms <= time.time() * 1000:
                TAKEN_OVER.labels("expired").inc()  # its client has stopped waiting
            elif lease.task.stream:
                await unavailable(lease, f"infer replica {dead} died mid-stream; retry")
                TAKEN_OVER.labels("unavailable").inc()
            else:
                await self.redis.delete(claim_key(request_id))
                await requeue(lease)
                TAKEN_OVER.labels("requeued").inc()
        await self.redis.delete(taken)
        await self.redis.srem(REPLICAS, dead)
