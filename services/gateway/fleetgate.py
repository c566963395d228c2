"""Whether any infer replica can serve a request, from their heartbeats in Redis: a request no live
replica can serve is refused at the door, and when the last replica stops beating every waiting
request is answered UNAVAILABLE now rather than at its deadline. (With replicas left, they take over
a dead one's requests: services/infer/leases.py.)"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import redis.asyncio as redis
from prometheus_client import Counter

from llmesh.common.fleet import HEARTBEAT_S, FleetView
from llmesh.common.outages import REDIS_ERRORS
from llmesh.common.registry import Route
from llmesh.common.status import error_status
from llmesh.common.tasks import cancel
from services.gateway.replies import PendingReplies

REFRESH_S = 0.5  # how often the heartbeats are read: a dead fleet is noticed this fast
# Refuse only after reading Redis this long without a failure: a restarted Redis has lost heartbeats
# that replicas beat again within HEARTBEAT_S.
SETTLE_S = 1.5 * HEARTBEAT_S
FAILED_FAST = Counter(
    "llmesh_gateway_failed_fast_total", "Requests answered UNAVAILABLE because no infer replica could serve them", ["when"]
)


class FleetGate:
    def __init__(self, redis_client: redis.Redis, pending: PendingReplies) -> None:
        self.redis = redis_client
        self.pending = pending
        self.view = FleetView()
        self._read_since: float | None = None  # loop time since which every read succeeded
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self._read()
        self._watch = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        await cancel(self._watch)

    async def why_down(self, route: Route) -> str:
        """'' when a live replica is ready with the route's version, else why not. The view is read
        again before refusing (it may be up to REFRESH_S old); without Redis, no refusal."""
        if self.view.can_serve(route.model, route.version):
            return ""
        try:
            await self._read()
        except REDIS_ERRORS:
            return ""
        if self.view.can_serve(route.model, route.version) or not self._settled():
            return ""
        FAILED_FAST.labels("at the door").inc()
        return self.view.why_not(route.model, route.version)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self._read()
            except REDIS_ERRORS:
                continue
            if self._settled() and not self.view.live and len(self.pending):
                error = error_status(grpc.StatusCode.UNAVAILABLE, self.view.why_not("", 0))
                FAILED_FAST.labels("in flight").inc(self.pending.fail_all(error))

    async def _read(self) -> None:
        now = asyncio.get_running_loop().time()
        try:
            self.view = await FleetView.read(self.redis)
        except REDIS_ERRORS:
            self._read_since = None
            raise
        if self._read_since is None:
            self._read_since = now

    def _settled(self) -> bool:
        since = self._read_since
        return since is not None and asyncio.get_running_loop().time() - since >= SETTLE_S
