"""The infer service: applies release events to its Triton repository and answers inference
requests: Triton generates the tokens, infer decodes them and publishes the text to the request's
reply-to topic."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Sequence

import grpc
from faststream.kafka import KafkaMessage
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from llmesh.common import kafka, topics
from llmesh.common.apikeys import ApiKeyStore
from llmesh.common.detokenizer import StreamDecoder
from llmesh.common.events import InvalidEvent, ReleaseEvent
from llmesh.common.outages import internal_error
from llmesh.common.registry import Registry
from llmesh.common.serving import KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.common.status import error_status
from llmesh.common.tokenizers import TokenizerCatalog, UnknownVersion
from llmesh.common.topics import Header
from llmesh.v1 import common_pb2, events_pb2, infer_pb2, infer_pb2_grpc
from services.infer.chunks import ChunkStream
from services.infer.leases import Lease, ReplicaLeases
from services.infer.reconcile import Reconciler, VersionStates
from services.infer.releases import ReleaseApplier
from services.infer.repository import ModelRepository, ModelStore
from services.infer.served import ServedVersions
from services.infer.settings import InferSettings
from services.infer.stubtally import StubTallyCollector
from services.infer.triton import GenerationError, TritonGenerator
from services.infer.tritonserver import TritonSupervisor

GENERATED = Counter("llmesh_infer_generated_tokens_total", "Tokens generated", ["model", "version"])
REQUESTS = Counter("llmesh_infer_requests_total", "Inference requests by outcome", ["model", "version", "code"])
EXPIRED = Counter("llmesh_infer_expired_total", "Requests whose deadline passed before generation: answered, not computed")
CANCELLED = Counter("llmesh_infer_cancelled_total", "Requests stopped because their client cancelled", ["when"])
SHADOW_DROPPED = Counter("llmesh_infer_shadow_dropped_total", "Mirrored requests dropped because the shadow backlog was full")
IN_FLIGHT = Gauge("llmesh_infer_in_flight", "Inference requests running now")
TRITON_TALLY = StubTallyCollector()
REGISTRY.register(TRITON_TALLY)
TTFT = Histogram(
    "llmesh_infer_first_token_seconds", "Triton time to first token", buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
)


class InferService(KafkaService, infer_pb2_grpc.InferServicer):
    name = "infer"

    def __init__(self, settings: InferSettings) -> None:
        super().__init__(settings)
        self.settings: InferSettings = settings
        self.registry = Registry.from_url(settings.redis_url)
        self.keys = ApiKeyStore(self.registry.redis)
        self.triton = TritonGenerator(settings.triton_url)
        kind = settings.instance_kind
        if kind == "auto":
            kind = "KIND_GPU" if shutil.which("nvidia-smi") else "KIND_CPU"
        self.repository = ModelRepository(
            settings.model_repository.resolve(),
            kind=kind,
            instances=settings.instances,
            parameters={
                "torch_threads": str(settings.torch_threads),
                "background_niceness": str(settings.mirror_niceness),
                "max_batch": str(settings.max_batch),
                "prefill_tokens": str(settings.prefill_tokens),
            },
        )
        TRITON_TALLY.folder = self.repository.root / ".tally"  # written by the model's stubs
        self.served = ServedVersions()
        self.catalog = TokenizerCatalog(self.registry)
        self.shadow_slots = asyncio.Semaphore(settings.shadow_concurrency)
        self.shadow_waiting = 0
        self.running: dict[str, asyncio.Task[None]] = {}  # request id -> the task answering it here
        self.cancels = RecentIds()  # cancels that may arrive before their task
        store = ModelStore(settings.model_store.resolve())
        states = VersionStates(self.registry, self.publish_status)
        self.reconciler = Reconciler(settings, self.registry, self.triton, self.repository, store, self.served, states)
        self.releases = ReleaseApplier(settings, self.registry, store, self.reconciler, self.catalog, states)
        self.leases = ReplicaLeases(self.registry.redis, settings.replica)
        self.supervisor = TritonSupervisor(
            self.triton, settings.triton_command, settings.triton_env, self.reconciler.reload_served
        )
        opts = settings.kafka
        # Every replica reads every release from the start (no group): one applies each event, the
        # others wait for it and skip it; a replay from offset 0 changes nothing.
        kafka.subscribe(
            self.broker, topics.RELEASES, kafka.consumer_options(opts, None, from_start=True, control=True), self.on_release
        )
        kafka.subscribe(
            self.broker,
            topics.INFER_REQUESTS,
            kafka.consumer_options(opts, topics.GROUP_INFER, from_start=True),
            self.on_request,
            self.polling,
        )
        # Every replica reads every cancel (no group): only the one running the request acts on it.
        kafka.subscribe(self.broker, topics.INFER_CANCELS, kafka.consumer_options(opts, None), self.on_cancel, self.polling)

    # ---- lifecycle -------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> list[str]:
        infer_pb2_grpc.add_InferServicer_to_server(self, server)
        return [infer_pb2.DESCRIPTOR.services_by_name["Infer"].full_name]

    def on_broker_lost(self) -> None:
        self.supervisor.keep_across_fresh_start()

    async def prepare(self) -> None:
        await self.supervisor.start()
        await self.reconciler.reconcile()  # what the desired state needs is loaded before requests are consumed
        # before consuming too: its first act settles leases left by an earlier run of this replica,
        # which must not include a request this run has claimed already
        await self.leases.start(self._requeue, self._unavailable)

    async def start(self) -> None:
        await super().start()
        await self.reconciler.start()

    async def stop(self) -> None:
        await self.reconciler.stop()
        await self.leases.stop()
        await super().stop()
        await self.triton.close()
        await self.supervisor.stop()
        await self.registry.close()

    # ---- gRPC ------------------------------------------------------------------------------

    async def ListLoaded(
        self, request: infer_pb2.ListLoadedRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.ListLoadedResponse:
        versions = []
        for loaded in self.served.all():
            record = await self.registry.version(loaded.model, loaded.version)
            versions.append(
                infer_pb2.LoadedVersion(
                    model=loaded.model,
                    version=loaded.version,
                    triton_model=loaded.triton_model,
                    state=record.state_enum() if record else common_pb2.VERSION_STATE_READY,
                    in_flight=loaded.in_flight,
                )
            )
        return infer_pb2.ListLoadedResponse(replica=self.settings.replica, triton_url=self.triton.url, versions=versions)

    # ---- releases --------------------------------------------------------------------------

    async def on_release(self, msg: KafkaMessage) -> None:
        raw = msg.raw_message
        offset = raw.offset  # type: ignore[union-attr]
        content_type = kafka.header(msg, Header.CONTENT_TYPE) or topics.CONTENT_TYPE_JSON
        try:
            event = ReleaseEvent.parse(msg.body, content_type, place=f"{raw.topic}/{raw.partition}/{offset}")  # type: ignore[union-attr]
        except InvalidEvent as err:
            if await self.registry.mark_refused("?", offset):
                await self.dead_letters.send(msg, str(err))
            return
        try:
            await self.releases.handle(event, offset)
        except InvalidEvent as err:  # this replica refused it first
            await self.dead_letters.send(msg, str(err))
            await self.publish_status(event, event.model, event.version, "FAILED", str(err))

    async def publish_status(self, event: ReleaseEvent | None, model: str, version: int, state: str, reason: str) -> None:
        status = events_pb2.ModelStatusEvent(
            event_id=event.event_id if event else "",
            model=model,
            version=version,
            state=common_pb2.VersionState.Value(f"VERSION_STATE_{state}"),
            reason=reason,
            replica=self.settings.replica,
            at=time.time(),
        )
        await self.outbox.send(status, topics.MODEL_STATUS, model)

    # ---- inference -------------------------------------------------------------------------

    async def on_request(self, msg: KafkaMessage) -> None:
        task = await self.dead_letters.decode(msg, events_pb2.InferTask, self.seal)
        if task is None:
            return
        if not task.request_id or not task.prompt_ids:
            await self.dead_letters.send(msg, "InferTask lacks request_id or prompt_ids")
            return
        reply_to = kafka.header(msg, Header.REPLY_TO)
        if not reply_to:
            await self.dead_letters.send(msg, "InferTask lacks the reply-to header: no one could receive the answer")
            return
        if task.request_id in self.cancels:
            CANCELLED.labels("before start").inc()
            return
        traceparent = kafka.header(msg, Header.TRACEPARENT)
        reply = Reply(self.outbox, task, reply_to, traceparent, expired=kafka.expired(msg))
        if task.request_id.endswith(topics.SHADOW_SUFFIX):
            await self._mirror(task, reply)  # no lease: a lost mirror is a missing pair, and no client waits
        elif await self.leases.claim(Lease(task, reply_to, traceparent)):
            await self.in_flight.spawn(self._answer(task, reply))

    async def _answer(self, task: events_pb2.InferTask, reply: Reply) -> None:
        current = asyncio.current_task()
        assert current is not None
        self.running[task.request_id] = current
        try:
            await self._generate(task, reply)
        finally:
            self.running.pop(task.request_id, None)
            await self.leases.done(task.request_id)

    async def on_cancel(self, msg: KafkaMessage) -> None:
        cancel = await self.dead_letters.decode(msg, events_pb2.CancelTask, self.seal)
        if cancel is None:
            return
        self.cancels.add(cancel.request_id)
        if (running := self.running.get(cancel.request_id)) is not None:
            running.cancel(f"cancelled by the client: {cancel.reason}")

    async def _requeue(self, lease: Lease) -> None:
        await self.outbox.task(lease.task, lease.reply_to, lease.traceparent)

    async def _unavailable(self, lease: Lease, reason: str) -> None:
        reply = Reply(self.outbox, lease.task, lease.reply_to, lease.traceparent)
        # unnumbered: the dead replica may have sent chunks 1..n already, and this one must still arrive
        await reply.send(
            events_pb2.TextChunk(final=True, error=error_status(grpc.StatusCode.UNAVAILABLE, reason)), numbered=False
        )

    async def _mirror(self, task: events_pb2.InferTask, reply: Reply) -> None:
        """Mirrored requests yield to client requests: a few at a time, dropped beyond a backlog
        (eval counts a dropped mirror as a missing pair; no client waits for it)."""
        if self.shadow_waiting >= self.settings.shadow_backlog:
            SHADOW_DROPPED.inc()
            return
        self.shadow_waiting += 1

        async def run() -> None:
            async with self.shadow_slots:
                self.shadow_waiting -= 1
                await self._generate(task, reply)

        await self.in_flight.spawn(run())

    async def _generate(self, task: events_pb2.InferTask, reply: Reply) -> None:
        code = grpc.StatusCode.OK
        IN_FLIGHT.inc()
        try:
            code = await self._run(task, reply)
        finally:
            IN_FLIGHT.dec()
            REQUESTS.labels(task.model, str(task.version), code.name).inc()

    async def _run(self, task: events_pb2.InferTask, reply: Reply) -> grpc.StatusCode:
        loaded = self.served.get(task.model, task.version)
        remaining = (task.deadline_unix_ms / 1000 - time.time()) if task.deadline_unix_ms else 300.0
        if reply.expired:
            remaining = 0.0
        if loaded is None:
            code, message = (
                grpc.StatusCode.UNAVAILABLE,
                f"{task.model}@{task.version} is not loaded on replica {self.settings.replica}",
            )
        elif not self.supervisor.up:
            code, message = grpc.StatusCode.UNAVAILABLE, f"Triton of replica {self.settings.replica} is restarting; retry"
        elif remaining <= 0:
            EXPIRED.inc()
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before generation started"
        else:
            try:
                # counted before the first await: a retiring version must not drain and unload meanwhile
                with self.served.running(loaded):
                    tokenizer = await self.catalog.get(task.model, task.version)
                    chunks = ChunkStream(
                        reply.send,
                        StreamDecoder(tokenizer.tokenizer, list(task.sampling.stop)),
                        self.settings.stream_interval_ms / 1000,
                    )
                    try:
                        await self._stream(task, loaded.triton_model, remaining, chunks)
                    except asyncio.CancelledError:
                        if task.request_id not in self.cancels:
                            raise  # shutting down, not a client's cancel
                        asyncio.current_task().uncancel()  # type: ignore[union-attr]
                        CANCELLED.labels("generating").inc()
                        await chunks.cancelled(len(task.prompt_ids))
                        return grpc.StatusCode.CANCELLED
                return grpc.StatusCode.OK
            except UnknownVersion as err:
                code, message = grpc.StatusCode.NOT_FOUND, str(err)
            except (TimeoutError, GenerationError) as err:
                if isinstance(err, TimeoutError) and task.deadline_unix_ms:  # the stream's timeout: the time left to the deadline
                    code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed during generation"
                elif not await self.triton.is_live():
                    code, message = grpc.StatusCode.UNAVAILABLE, f"Triton of replica {self.settings.replica} died; retry"
                else:  # Triton's (Python) error text stays in the log, under the id the client gets
                    code, message = grpc.StatusCode.INTERNAL, f"generation failed: {internal_error(task.model, err)}"
        await reply.send(events_pb2.TextChunk(final=True, error=error_status(code, message)))
        return code

    async def _stream(self, task: events_pb2.InferTask, triton_model: str, timeout: float, chunks: ChunkStream) -> None:
        started = time.perf_counter()
        prompt, mirrored = list(task.prompt_ids), task.request_id.endswith(topics.SHADOW_SUFFIX)
        steps = self.triton.generate(triton_model, task.request_id, prompt, task.sampling, timeout, task.stream, mirrored)
        try:
            async for step in steps:
                if task.stream and chunks.first:
                    TTFT.observe(time.perf_counter() - started)
                GENERATED.labels(task.model, str(task.version)).inc(len(step.token_ids))
                if not step.finish_reason:
                    chunks.add(step.token_ids, publish=task.stream)
                    continue
                await chunks.finish(
                    step.token_ids,
                    finish_reason=common_pb2.FinishReason.Value(f"FINISH_REASON_{step.finish_reason.upper()}"),
                    prompt_tokens=len(task.prompt_ids),
                    generation_ms=(time.perf_counter() - started) * 1000,
                )
                return
        finally:
            await chunks.close()
        raise GenerationError("Triton closed the stream without a final response")


class Reply:
    """Where one request's TextChunks go: its reply-to topic, keyed by request id, with its trace;
    numbered, so that the gateway drops a chunk replayed by someone else."""

    def __init__(
        self, outbox: kafka.Outbox, task: events_pb2.InferTask, topic: str, traceparent: str, *, expired: bool = False
    ) -> None:
        self.outbox, self.task, self.topic = outbox, task, topic
        self.expired = expired  # the deadline header had passed when the task arrived
        self.traceparent = traceparent
        self.sent = 0

    async def send(self, chunk: events_pb2.TextChunk, *, numbered: bool = True) -> None:
        task = self.task
        self.sent += numbered
        chunk.request_id, chunk.model, chunk.version = task.request_id, task.model, task.version
        chunk.seq = self.sent if numbered else 0
        await self.outbox.send(chunk, self.topic, task.request_id, request_id=task.request_id, traceparent=self.traceparent)


class RecentIds:
    """The latest request ids seen (bounded): a cancel is remembered for a task that arrives after it."""

    def __init__(self, limit: int = 50_000) -> None:
        self._ids: dict[str, None] = {}
        self._limit = limit

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self._limit:
            del self._ids[next(iter(self._ids))]


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(InferSettings, argv, "infer")
    return asyncio.run(run_service(InferService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
