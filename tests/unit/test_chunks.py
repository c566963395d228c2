"""ChunkStream: streamed tokens coalesce while a publish is in flight; nothing is lost or reordered."""

from __future__ import annotations

import asyncio

from llmesh.v1 import common_pb2, events_pb2
from services.infer.chunks import ChunkStream


class SlowKafka:
    def __init__(self, delay: float) -> None:
        self.delay, self.sent = delay, []

    async def send(self, chunk: events_pb2.TokenChunk) -> None:
        await asyncio.sleep(self.delay)
        self.sent.append(chunk)


async def test_tokens_faster_than_publishing_leave_in_fewer_chunks_in_order():
    kafka = SlowKafka(0.01)
    chunks = ChunkStream(kafka.send, ["\n\n"])
    for token in range(10):
        chunks.add([token], publish=True)
        await asyncio.sleep(0.002)
    await chunks.finish([10], finish_reason=common_pb2.FINISH_REASON_LENGTH)
    assert [t for c in kafka.sent for t in c.token_ids] == list(range(11))
    assert 2 <= len(kafka.sent) < 11
    assert list(kafka.sent[0].stop) == ["\n\n"] and all(not c.stop for c in kafka.sent[1:])
    assert kafka.sent[-1].final and [c.final for c in kafka.sent[:-1]] == [False] * (len(kafka.sent) - 1)


async def test_tokens_slower_than_publishing_go_out_one_by_one():
    kafka = SlowKafka(0)
    chunks = ChunkStream(kafka.send, [])
    for token in range(5):
        chunks.add([token], publish=True)
        await asyncio.sleep(0.005)
    await chunks.finish([])
    assert [list(c.token_ids) for c in kafka.sent] == [[0], [1], [2], [3], [4], []]


async def test_unary_holds_everything_for_the_final_chunk():
    kafka = SlowKafka(0)
    chunks = ChunkStream(kafka.send, ["."])
    chunks.add([1, 2], publish=False)
    await chunks.finish([3], prompt_tokens=7)
    assert len(kafka.sent) == 1
    assert list(kafka.sent[0].token_ids) == [1, 2, 3] and kafka.sent[0].prompt_tokens == 7 and list(kafka.sent[0].stop) == ["."]
