"""Notices when the Kafka broker goes away.

A restarted broker may have lost every topic and committed offset (the embedded broker keeps them in
memory), and Kafka clients that reconnect by themselves then lose messages for good: they resend
queued batches to topics not yet created again (the embedded broker then refuses every later write
to that partition) and resume at stale positions. So a service that loses its broker starts afresh
at once (llmesh/common/serving.py): its clients and their queues are gone, and the new process waits
for the broker, creates the topics and places every consumer anew. Meanwhile its gRPC port is
closed: callers get UNAVAILABLE at once instead of waiting for a send to time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from llmesh.common.tasks import cancel

log = logging.getLogger("llmesh.brokerwatch")
BROKER_UP = Gauge("llmesh_broker_up", "1 while the Kafka broker accepts connections")
LOST = Counter("llmesh_broker_lost_total", "Times the Kafka broker stopped accepting connections")


async def reachable(bootstrap: str, timeout: float = 0.5) -> bool:
    """Does any bootstrap server accept a TCP connection? (Costs the broker no request.)"""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


async def wait_until_reachable(bootstrap: str, period_s: float = 0.5) -> None:
    if await reachable(bootstrap):
        return
    log.warning("waiting for the Kafka broker", extra={"bootstrap": bootstrap})
    while not await reachable(bootstrap):
        await asyncio.sleep(period_s)


class BrokerWatch:
    def __init__(self, bootstrap: str, on_lost: Callable[[], None], period_s: float = 0.5) -> None:
        self.bootstrap, self.on_lost, self.period_s = bootstrap, on_lost, period_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        BROKER_UP.set(1)
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        await cancel(self._task)

    async def _watch(self) -> None:
        misses = 0
        while misses < 2:  # two misses in a row: one could be a moment's backlog
            await asyncio.sleep(self.period_s)
            misses = 0 if await reachable(self.bootstrap) else misses + 1
        BROKER_UP.set(0)
        LOST.inc()
        log.error("the Kafka broker is unreachable", extra={"bootstrap": self.bootstrap})
        self.on_lost()
