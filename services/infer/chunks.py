"""The answer to one request as infer publishes it: TextChunks on the request's reply-to topic."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from llmesh.common.detokenizer import StreamDecoder
from llmesh.v1 import common_pb2, events_pb2

Send = Callable[[events_pb2.TextChunk], Awaitable[None]]


class ChunkStream:
    """Streamed tokens are decoded and go out as they come, one publish at a time: tokens that
    arrive while a chunk is being published leave together in the next one. A model that outpaces
    the mesh then costs fewer Kafka messages (and less CPU downstream); one that does not waits for
    nothing. Tokens that end inside a multi-byte character or a possible stop string wait for the
    tokens that complete them."""

    def __init__(self, send: Send, decoder: StreamDecoder, interval_s: float = 0.0) -> None:
        self._send = send
        self._decoder = decoder
        self._interval_s = interval_s  # after a publish, the next waits at least this long
        self._held: list[int] = []
        self._sending: asyncio.Task[None] | None = None
        self._pacing = False  # the drain task is only waiting out the interval
        self.first = True  # no token has come yet

    def add(self, token_ids: Sequence[int], *, publish: bool) -> None:
        """Tokens generated; `publish` (streaming) sends them as soon as no other chunk is in flight."""
        self.first = False
        self._held.extend(token_ids)
        if publish and self._held and (self._sending is None or self._sending.done()):
            if self._sending is not None:
                self._sending.result()  # a failed publish fails the request
            self._sending = asyncio.create_task(self._drain())

    async def finish(
        self, token_ids: Sequence[int], finish_reason: common_pb2.FinishReason.ValueType, prompt_tokens: int, generation_ms: float
    ) -> None:
        """The last chunk: the text of every token not sent yet, and the request's outcome."""
        if self._sending is not None:
            if self._pacing:
                self._sending.cancel()  # the final chunk need not wait out the interval
            with contextlib.suppress(asyncio.CancelledError):
                await self._sending
        decoder = self._decoder
        text = decoder.push([*self._held, *token_ids]) + decoder.finish()
        self._held = []
        stopped = decoder.stopped or finish_reason == common_pb2.FINISH_REASON_STOP
        await self._send(
            events_pb2.TextChunk(
                text=text,
                final=True,
                finish_reason=common_pb2.FINISH_REASON_STOP if stopped else finish_reason,
                usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(decoder.ids)),
                generation_ms=generation_ms,
            )
        )

    async def cancelled(self, prompt_tokens: int) -> None:
        """The client cancelled: a last chunk that counts the tokens generated until now (its text
        goes to no one), so that the key is charged for exactly those."""
        if self._sending is not None:
            self._sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sending
        completion = len(self._decoder.ids) + len(self._held)
        usage = common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion)
        await self._send(events_pb2.TextChunk(final=True, finish_reason=common_pb2.FINISH_REASON_CANCELLED, usage=usage))

    async def close(self) -> None:
        """Wait for a chunk still being published (before an error chunk may follow it)."""
        if self._sending is not None:
            with contextlib.suppress(Exception):
                await self._sending

    async def _drain(self) -> None:
        while self._held:
            ids, self._held = self._held, []
            if text := self._decoder.push(ids):
                await self._send(events_pb2.TextChunk(text=text))
                if self._interval_s:
                    self._pacing = True
                    await asyncio.sleep(self._interval_s)
                    self._pacing = False
