"""ChunkStream: streamed tokens are decoded and coalesce while a publish is in flight; no text is
lost, reordered, split inside a character or passed beyond a stop string."""

from __future__ import annotations

import asyncio

import pytest

from llmesh.common.detokenizer import StreamDecoder
from llmesh.lm.build import train_tokenizer
from llmesh.v1 import common_pb2, events_pb2
from services.infer.chunks import ChunkStream

TEXT = "alpha beta gamma délta 🎉 epsilon zeta"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT * 30, vocab_size=300)


class SlowKafka:
    def __init__(self, delay: float) -> None:
        self.delay, self.sent = delay, []

    async def send(self, chunk: events_pb2.TextChunk) -> None:
        await asyncio.sleep(self.delay)
        self.sent.append(chunk)


def _finish(chunks: ChunkStream, ids: list[int], reason=common_pb2.FINISH_REASON_LENGTH, prompt_tokens: int = 3):
    return chunks.finish(ids, finish_reason=reason, prompt_tokens=prompt_tokens, generation_ms=1.0)


async def test_tokens_faster_than_publishing_leave_in_fewer_chunks_in_order(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    kafka = SlowKafka(0.01)
    chunks = ChunkStream(kafka.send, StreamDecoder(tokenizer))
    for token in ids[:-1]:
        chunks.add([token], publish=True)
        await asyncio.sleep(0.002)
    await _finish(chunks, ids[-1:])
    assert "".join(c.text for c in kafka.sent) == TEXT
    assert 2 <= len(kafka.sent) < len(ids)
    assert kafka.sent[-1].final and not any(c.final for c in kafka.sent[:-1])
    assert kafka.sent[-1].usage.completion_tokens == len(ids) and kafka.sent[-1].usage.prompt_tokens == 3


async def test_tokens_slower_than_publishing_go_out_as_they_decode(tokenizer):
    ids = tokenizer.encode("alpha beta gamma").ids
    kafka = SlowKafka(0)
    chunks = ChunkStream(kafka.send, StreamDecoder(tokenizer))
    for token in ids:
        chunks.add([token], publish=True)
        await asyncio.sleep(0.005)
    await _finish(chunks, [])
    assert [c.text for c in kafka.sent[:-1]] == [tokenizer.decode([t]) for t in ids]
    assert kafka.sent[-1].final and kafka.sent[-1].text == ""


async def test_unary_holds_everything_for_the_final_chunk(tokenizer):
    ids = tokenizer.encode("alpha beta").ids
    kafka = SlowKafka(0)
    chunks = ChunkStream(kafka.send, StreamDecoder(tokenizer))
    chunks.add(ids[:-1], publish=False)
    await _finish(chunks, ids[-1:], prompt_tokens=7)
    assert len(kafka.sent) == 1
    assert kafka.sent[0].text == "alpha beta" and kafka.sent[0].usage.prompt_tokens == 7


async def test_a_stop_string_ends_the_text_and_reports_stop(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    kafka = SlowKafka(0)
    chunks = ChunkStream(kafka.send, StreamDecoder(tokenizer, ["gamma"]))
    for token in ids:
        chunks.add([token], publish=True)
        await asyncio.sleep(0.001)
    await _finish(chunks, [])
    assert "".join(c.text for c in kafka.sent) == "alpha beta "
    assert kafka.sent[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_an_interval_paces_chunks_but_not_the_final_one(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    kafka = SlowKafka(0)
    chunks = ChunkStream(kafka.send, StreamDecoder(tokenizer), interval_s=0.05)
    began = asyncio.get_running_loop().time()
    for token in ids:
        chunks.add([token], publish=True)
        await asyncio.sleep(0.002)
    started = asyncio.get_running_loop().time()
    await _finish(chunks, [])
    assert asyncio.get_running_loop().time() - started < 0.04, "the final chunk waited out the interval"
    assert "".join(c.text for c in kafka.sent) == TEXT
    paced = 1 + int((started - began) / 0.05)  # the first chunk at once, then at most one per 50 ms
    assert len(kafka.sent) <= paced + 1 < len(ids)
