"""The bare broker hop: aiokafka produce -> consume of one small message with the mesh's producer
and consumer settings, the consumer already waiting (as the services' consumers are) and messages
sent at random gaps. The mesh's own cost per hop is measured against it.

A consumer that is already waiting matters: the embedded broker answers a waiting fetch only when
its wait expires, while a fetch sent after the data arrived is answered at once; timing a send
followed by a fresh getone() would measure the second case, which no service sees."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from llmesh.common.settings import KafkaSettings


async def round_trips(settings: KafkaSettings, n: int, payload: bytes = b"x" * 200) -> list[float]:
    """`n` sequential produce -> consume round trips in ms."""
    topic = f"llmesh.bench.rtt.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, **settings.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=0, acks=1, **settings.client_kwargs())
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        auto_offset_reset="latest",
        **settings.client_kwargs(),
    )
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.01)
        await consumer.seek_to_end()
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def consume() -> None:
            while True:
                await consumer.getone()
                arrived.put_nowait(time.perf_counter())

        reader = asyncio.create_task(consume())
        out = []
        try:
            for _ in range(n):
                await asyncio.sleep(random.uniform(0.002, 0.012))
                started = time.perf_counter()
                await producer.send_and_wait(topic, payload)
                out.append((await arrived.get() - started) * 1000)
        finally:
            reader.cancel()
        return out
    finally:
        await consumer.stop()
        await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, **settings.client_kwargs())
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
