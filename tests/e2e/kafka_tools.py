"""Reading the mesh's topics from tests."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from llmesh.common import topics
from llmesh.common.events import InvalidEvent, ReleaseEvent
from llmesh.v1 import events_pb2


async def _release_dead_letters(bootstrap: str, event_ids: set[str], timeout: float) -> dict[str, str]:
    consumer = AIOKafkaConsumer(
        topics.DEAD_LETTER, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=50
    )
    await consumer.start()
    reasons: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout):
            while not event_ids <= set(reasons):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        headers = {k: v.decode() for k, v in r.headers}
                        if headers.get("dlq-original-topic") != topics.RELEASES:
                            continue
                        try:
                            event = ReleaseEvent.parse(r.value, headers.get("content-type", ""))
                        except InvalidEvent:
                            continue
                        reasons[event.event_id] = headers["dlq-reason"]
    finally:
        await consumer.stop()
    return reasons


def release_dead_letter(bootstrap: str, event_id: str, timeout: float = 60) -> str:
    """The reason the release event `event_id` was dead-lettered (waits for it)."""
    return asyncio.run(_release_dead_letters(bootstrap, {event_id}, timeout))[event_id]


async def dead_letters_for(
    bootstrap: str, sends: list[tuple[str, bytes, dict[str, str]]], timeout: float = 30
) -> dict[str, dict[str, str]]:
    """Publish (topic, payload, headers with a unique 'marker'); the dead letters they became, by marker."""
    consumer = AIOKafkaConsumer(
        topics.DEAD_LETTER, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=50
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await consumer.start()
    await producer.start()
    found: dict[str, dict[str, str]] = {}
    try:
        for topic, payload, headers in sends:
            await producer.send_and_wait(
                topic, payload, key=headers["marker"].encode(), headers=[(k, v.encode()) for k, v in headers.items()]
            )
        markers = {h["marker"] for _, _, h in sends}
        async with asyncio.timeout(timeout):
            while not markers <= set(found):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        hdrs = {k: v.decode() for k, v in r.headers}
                        if "marker" in hdrs:
                            found[hdrs["marker"]] = hdrs | {"payload": r.value.decode(errors="replace")}
    finally:
        await consumer.stop()
        await producer.stop()
    return found


async def _audit_records(bootstrap: str, ids: set[str], timeout: float) -> list[events_pb2.AuditRecord]:
    consumer = AIOKafkaConsumer(topics.AUDIT, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=50)
    await consumer.start()
    records: list[events_pb2.AuditRecord] = []
    try:
        async with asyncio.timeout(timeout):
            while not ids <= {r.id for r in records}:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records += [events_pb2.AuditRecord.FromString(r.value) for r in batch]
    finally:
        await consumer.stop()
    return records


def audit_records(bootstrap: str, ids: set[str], timeout: float = 60) -> list[events_pb2.AuditRecord]:
    """The audit topic from its start until every entry of `ids` arrived (waits for them)."""
    return asyncio.run(_audit_records(bootstrap, ids, timeout))
