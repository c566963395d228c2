"""Reading the mesh's topics from tests."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer

from llmesh.common import topics
from llmesh.common.events import InvalidEvent, ReleaseEvent


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
