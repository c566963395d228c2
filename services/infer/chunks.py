"""The TokenChunks of one request, as infer publishes them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from llmesh.v1 import events_pb2

Send = Callable[[events_pb2.TokenChunk], Awaitable[None]]


class ChunkStream:
    """Streamed tokens go out as they come, one publish at a time: tokens that arrive while a chunk
    is being published leave together in the next one. A model that outpaces the mesh then costs
    fewer Kafka messages (and less CPU downstream); one that does not waits for nothing."""

    def __init__(self, send: Send, stop: Sequence[str]) -> None:
        self._send = send
        self._stop = list(stop)  # the decoder learns the stop strings from the request's first chunk
        self._held: list[int] = []
        self._sending: asyncio.Task[None] | None = None
        self.first = True  # no token has come yet

    def add(self, token_ids: Sequence[int], *, publish: bool) -> None:
        """Tokens generated; `publish` (streaming) sends them as soon as no other chunk is in flight."""
        self.first = False
        self._held.extend(token_ids)
        if publish and self._held and (self._sending is None or self._sending.done()):
            if self._sending is not None:
                self._sending.result()  # a failed publish fails the request
            self._sending = asyncio.create_task(self._drain())

    async def finish(self, token_ids: Sequence[int], **final: Any) -> None:
        """The last chunk: every token not sent yet, and the request's outcome (`final` fields)."""
        if self._sending is not None:
            await self._sending
        chunk = self._chunk([*self._held, *token_ids])
        self._held = []
        chunk.final = True
        for name, value in final.items():
            setattr(chunk, name, value)
        await self._send(chunk)

    async def close(self) -> None:
        """Wait for a chunk still being published (before an error chunk may follow it)."""
        if self._sending is not None:
            with contextlib.suppress(Exception):
                await self._sending

    async def _drain(self) -> None:
        while self._held:
            ids, self._held = self._held, []
            await self._send(self._chunk(ids))

    def _chunk(self, token_ids: list[int]) -> events_pb2.TokenChunk:
        chunk = events_pb2.TokenChunk(token_ids=token_ids, stop=self._stop)
        self._stop = []
        return chunk
