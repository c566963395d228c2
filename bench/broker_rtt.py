"""The bare broker round trip: aiokafka produce -> consume of one small message, sequentially, with
the mesh's producer and consumer settings. The mesh's own cost per hop is measured against it."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from llmesh.common.settings import KafkaSettings


async def round_trips(settings: KafkaSettings, n: int, payload: bytes = b"x" * 200) -> list[float]:
    """`n` sequential produce -> consume round trips in ms."""
    topic = f"llmesh.bench.rtt.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=0, acks=1)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.bootstrap, fetch_max_wait_ms=settings.fetch_max_wait_ms, auto_offset_reset="latest"
    )
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.01)
        await consumer.seek_to_end()
        out = []
        for _ in range(n):
            started = time.perf_counter()
            await producer.send_and_wait(topic, payload)
            await consumer.getone()
            out.append((time.perf_counter() - started) * 1000)
        return out
    finally:
        await consumer.stop()
        await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
