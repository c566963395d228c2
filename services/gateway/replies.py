"""Routes chunks from this gateway's reply topic to the request waiting for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llmesh.v1 import common_pb2, events_pb2


class ReplyTimeout(TimeoutError):
    pass


class PendingReplies:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[events_pb2.TextChunk]] = {}
        self._seq: dict[str, int] = {}  # the last chunk number delivered, per request

    def __len__(self) -> int:
        return len(self._queues)

    def open(self, request_id: str) -> None:
        self._queues[request_id] = asyncio.Queue()
        self._seq[request_id] = 0

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._seq.pop(request_id, None)

    def deliver(self, chunk: events_pb2.TextChunk) -> bool:
        """Hand a chunk to its waiting request; False if nobody waits (late or foreign reply) or it
        was delivered already (a replay: chunks are numbered)."""
        queue = self._queues.get(chunk.request_id)
        if queue is None:
            return False
        if chunk.seq:
            if chunk.seq <= self._seq[chunk.request_id]:
                return False
            self._seq[chunk.request_id] = chunk.seq
        queue.put_nowait(chunk)
        return True

    def fail_all(self, error: common_pb2.ErrorStatus) -> int:
        """End every waiting request with `error` (no one can answer them any more); how many."""
        for request_id, queue in self._queues.items():
            queue.put_nowait(events_pb2.TextChunk(request_id=request_id, final=True, error=error))
        return len(self._queues)

    async def chunks(self, request_id: str, deadline: float) -> AsyncIterator[events_pb2.TextChunk]:
        """Yield chunks until the final one; raise ReplyTimeout at the deadline (loop time)."""
        queue = self._queues[request_id]
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ReplyTimeout
            try:
                chunk = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                raise ReplyTimeout from None
            yield chunk
            if chunk.final:
                return
