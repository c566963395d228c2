"""Adaptive polling for the consumers on the request path.

The embedded broker answers a waiting fetch only when the fetch's wait expires (see
`docs/benchmarks.md`), so a consumer's fetch wait bounds its latency per hop, and every poll costs
CPU in the broker and the service even when no request flows. A service therefore polls fast
(`fetch_max_wait_ms`) while requests flow and slowly (`idle_fetch_max_wait_ms`) after `idle_after_s`
without any; handling or sending request-path work switches every tracked consumer back to fast at
once, so a service that sends a request is polling fast for its answer before it arrives. The cost
is paid by the first request after an idle spell: up to one slow wait per idle hop.

aiokafka reads the wait from its fetcher each time it builds a fetch request; this module sets that
attribute (`Fetcher._fetch_max_wait_ms`, aiokafka 0.14), checked by tests/unit/test_polling.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from llmesh.common.settings import KafkaSettings
from llmesh.common.tasks import cancel


class AdaptivePolling:
    def __init__(self, settings: KafkaSettings) -> None:
        self.fast_ms = settings.fetch_max_wait_ms
        self.slow_ms = max(settings.idle_fetch_max_wait_ms, settings.fetch_max_wait_ms)
        self.idle_after_s = settings.idle_after_s
        self.fast = True  # consumers start with fetch_max_wait_ms
        self._subscribers: list[Any] = []
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def track(self, subscriber: Any) -> None:
        self._subscribers.append(subscriber)

    def touch(self) -> None:
        """Request-path work is flowing (or about to): poll fast."""
        self._last = time.monotonic()
        if not self.fast:
            self._set(self.fast_ms)

    def start(self) -> None:
        if self.slow_ms > self.fast_ms and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.idle_after_s / 4)
            if self.fast and time.monotonic() - self._last > self.idle_after_s:
                self._set(self.slow_ms)

    def _set(self, wait_ms: int) -> None:
        self.fast = wait_ms == self.fast_ms
        for subscriber in self._subscribers:
            fetcher = getattr(getattr(subscriber, "consumer", None), "_fetcher", None)
            if fetcher is not None:
                fetcher._fetch_max_wait_ms = wait_ms
