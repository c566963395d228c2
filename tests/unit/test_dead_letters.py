"""Dead letters in memory (FastStream's TestKafkaBroker): whatever was refused reaches the DLQ with
its reason, an oversized message cut to what a producer may send, with its size and digest."""

from __future__ import annotations

import hashlib

import pytest
from faststream.kafka import KafkaBroker, KafkaMessage, TestKafkaBroker

from llmesh.common import topics
from llmesh.common.kafka import DeadLetters
from llmesh.common.topics import Header


@pytest.fixture
def broker() -> tuple[KafkaBroker, list[KafkaMessage]]:
    broker = KafkaBroker()
    letters = DeadLetters(broker, "test")
    received: list[KafkaMessage] = []

    @broker.subscriber("incoming")
    async def refuse(msg: KafkaMessage) -> None:
        await letters.send(msg, "refused: too big")

    @broker.subscriber(topics.DEAD_LETTER)
    async def collect(msg: KafkaMessage) -> None:
        received.append(msg)

    return broker, received


async def test_an_oversized_message_is_dead_lettered_cut_with_its_size_and_digest(broker):
    kafka, received = broker
    body = bytes(range(256)) * 8192  # 2 MiB: over the producer's 1 MiB request limit
    async with TestKafkaBroker(kafka) as test:
        await test.publish(
            body, "incoming", key=b"k" * 5000, headers={"content-type": "application/octet-stream", "x": "y" * 5000}
        )
    [letter] = received
    assert letter.body == body[: topics.DLQ_BODY_LIMIT]
    assert letter.headers[Header.DLQ_SIZE] == str(len(body))
    assert letter.headers[Header.DLQ_SHA256] == hashlib.sha256(body).hexdigest()
    assert letter.headers[Header.DLQ_REASON] == "refused: too big"
    assert letter.headers[Header.DLQ_TOPIC] == "incoming"
    assert len(letter.headers["x"]) <= 1024 and len(letter.raw_message.key) <= 1024  # type: ignore[union-attr]


async def test_a_small_message_is_dead_lettered_byte_for_byte(broker):
    kafka, received = broker
    async with TestKafkaBroker(kafka) as test:
        await test.publish(b'{"model": "chat"}', "incoming", key=b"chat")
    [letter] = received
    assert letter.body == b'{"model": "chat"}' and Header.DLQ_SIZE not in letter.headers
