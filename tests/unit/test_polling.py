"""AdaptivePolling: fast while request-path work flows, slow after idle, fast again at once."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

from aiokafka.consumer.fetcher import Fetcher

from llmesh.common.polling import AdaptivePolling
from llmesh.common.settings import KafkaSettings


def _subscriber(wait_ms: int) -> SimpleNamespace:
    return SimpleNamespace(consumer=SimpleNamespace(_fetcher=SimpleNamespace(_fetch_max_wait_ms=wait_ms)))


def test_aiokafka_fetcher_reads_the_wait_from_the_attribute_we_set():
    # Fetch requests are built from this attribute each time (aiokafka 0.14); an upgrade that renames it fails here.
    assert "self._fetch_max_wait_ms," in inspect.getsource(Fetcher._get_actions_per_node)


async def test_idle_consumers_slow_down_and_touch_speeds_them_up():
    settings = KafkaSettings(fetch_max_wait_ms=5, idle_fetch_max_wait_ms=40, idle_after_s=0.2)
    polling = AdaptivePolling(settings)
    subscribers = [_subscriber(5), _subscriber(5), SimpleNamespace(consumer=None)]  # the last is not started yet
    for s in subscribers:
        polling.track(s)
    polling.start()
    try:
        await asyncio.sleep(0.1)
        assert [s.consumer._fetcher._fetch_max_wait_ms for s in subscribers[:2]] == [5, 5]
        await asyncio.sleep(0.4)
        assert [s.consumer._fetcher._fetch_max_wait_ms for s in subscribers[:2]] == [40, 40]
        polling.touch()
        assert [s.consumer._fetcher._fetch_max_wait_ms for s in subscribers[:2]] == [5, 5]
    finally:
        await polling.stop()


async def test_equal_waits_need_no_watcher():
    polling = AdaptivePolling(KafkaSettings(fetch_max_wait_ms=50, idle_fetch_max_wait_ms=50))
    polling.start()
    assert polling._task is None
