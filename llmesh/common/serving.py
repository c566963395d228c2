"""What every service process shares: gRPC server with health and reflection, Prometheus /metrics,
structured logs, and graceful shutdown (SIGTERM: report NOT_SERVING, drain in-flight work, exit 0)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from llmesh.common import kafka, logs
from llmesh.common.apikeys import ApiKeyStore
from llmesh.common.brokerwatch import BrokerWatch, wait_until_reachable
from llmesh.common.keycheck import KeyCheck
from llmesh.common.outages import OutageStatus
from llmesh.common.polling import AdaptivePolling
from llmesh.common.seal import MeshSeal
from llmesh.common.settings import ServiceSettings

log = logging.getLogger("llmesh.serving")
BROKER_STOP_S = 5.0


class Service(Protocol):
    """A service: its gRPC servicers plus the background work (Kafka consumers) it runs."""

    name: str

    def register(self, server: grpc.aio.Server) -> list[str]:
        """Add servicers to `server`; return their full service names (for health and reflection)."""

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Checks every call passes first (API keys, when required)."""

    async def start(self) -> None: ...

    async def stop_accepting(self, grace: float) -> None:
        """Close the service's doors beside gRPC (the gateway's HTTP API), letting in-flight requests
        finish within `grace` seconds; runs alongside the gRPC server's own graceful stop."""

    async def drain(self, timeout: float) -> None:
        """Stop taking new work and wait up to `timeout` seconds for in-flight work."""

    async def stop(self) -> None: ...


class InFlight:
    """Tracks background tasks so that shutdown can wait for them; bounds how many run at once."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    async def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start `coro` once a slot is free (callers block here: that is the backpressure)."""
        await self._slots.acquire()
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("drain timed out", extra={"cancelled": len(pending)})


async def run_service(service: Service, settings: ServiceSettings, ready: Callable[[], Awaitable[None]] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully. Returns the process exit code."""
    logs.configure(service.name, settings.log_level)
    interceptors = [OutageStatus(), *service.interceptors()]
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    names = service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = settings.server_credentials()
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        extra={
            "grpc": f"{settings.grpc_host}:{port}",
            "tls": credentials is not None,
            "metrics": f"{settings.metrics_host}:{metrics_server.server_port}",
        },
    )
    if ready:
        await ready()
    await stop.wait()
    log.info("shutting down: draining in-flight work", extra={"drain_seconds": settings.drain_seconds})
    await health_servicer.enter_graceful_shutdown()
    # RPCs first (they may wait on Kafka replies, so Kafka stays up), then Kafka-driven work.
    await asyncio.gather(server.stop(grace=settings.drain_seconds), service.stop_accepting(settings.drain_seconds))
    await service.drain(settings.drain_seconds)
    await service.stop()
    metrics_server.shutdown()
    log.info("stopped")
    return 0


def start_afresh() -> NoReturn:
    """Run this process's command again in this process (same pid: whoever supervises it sees no
    exit). Nothing of the old process survives: no client, no queued message, no open socket."""
    log.warning("starting afresh")
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


class KafkaService:
    """The lifecycle shared by services whose work arrives over Kafka: a tuned broker, dead letters,
    bounded in-flight work; start waits for the broker and creates topics, drain stops consuming and
    waits, stop disconnects. A service that loses its broker starts afresh (llmesh/common/brokerwatch.py)."""

    name = "service"
    keys: ApiKeyStore | None = None  # the callers' API keys (on the registry's Redis); set by each service

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.broker = kafka.make_broker(settings.kafka, f"llmesh-{self.name}-{settings.replica}")
        self.dead_letters = kafka.DeadLetters(self.broker, self.name)
        self.seal = MeshSeal(settings.mesh_key())
        self.outbox = kafka.Outbox(self.broker, self.seal)
        self.in_flight = InFlight(settings.max_in_flight)
        self.polling = AdaptivePolling(settings.kafka)
        self.broker_watch = BrokerWatch(settings.kafka.bootstrap, self._broker_lost)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """With `api_keys_required`, every call but health and reflection needs a key with the method's scope."""
        if not self.settings.api_keys_required:
            return []
        if self.keys is None:
            raise RuntimeError(f"{self.name} requires API keys but has no key store")
        return [KeyCheck(self.keys)]

    def extra_topics(self) -> dict[str, int]:
        """Topics of this service's own (name: partitions) beside the mesh's."""
        return {}

    async def stop_accepting(self, grace: float) -> None:
        """Only gRPC takes requests (the gateway adds its HTTP API)."""

    async def prepare(self) -> None:
        """Work after the broker is connected and before any message is consumed."""

    def on_broker_lost(self) -> None:
        """The broker stopped accepting connections; the service starts afresh right after this."""

    def _broker_lost(self) -> None:
        self.on_broker_lost()
        start_afresh()

    async def start(self) -> None:
        if self.seal.key is None:
            log.warning("mesh messages are not sealed: any Kafka client can forge replies (set LLMESH_MESH_HMAC_KEY)")
        await wait_until_reachable(self.settings.kafka.bootstrap)
        await kafka.ensure_topics(self.settings.kafka, self.extra_topics())
        await self.broker.connect()
        await self.prepare()
        await self.broker.start()
        self.polling.start()
        self.broker_watch.start()

    async def drain(self, timeout: float) -> None:
        stopping = [asyncio.create_task(subscriber.stop()) for subscriber in self.broker.subscribers]
        if stopping:
            _, pending = await asyncio.wait(stopping, timeout=BROKER_STOP_S)
            if pending:  # a consumer committing to a topic the broker lost retries for ever
                log.warning("Kafka consumers did not stop in time", extra={"consumers": len(pending)})
        await self.in_flight.drain(timeout)

    async def stop(self) -> None:
        await self.broker_watch.stop()
        await self.polling.stop()
        try:  # a consumer committing to a topic the broker lost retries for ever
            await asyncio.wait_for(self.broker.stop(), BROKER_STOP_S)
        except TimeoutError:
            log.warning("the Kafka clients did not close in time", extra={"seconds": BROKER_STOP_S})
