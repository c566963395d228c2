"""The gateway: the mesh's public gRPC API. Encodes each prompt with its version's tokenizer, puts
it on Kafka for infer, and streams back the replies addressed to it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaMessage
from prometheus_client import Counter, Gauge, Histogram

from llmesh.common import kafka, status, topics
from llmesh.common.apikeys import ApiKey, ApiKeyStore
from llmesh.common.fleet import HEARTBEAT_S, FleetView
from llmesh.common.keycheck import CALLER
from llmesh.common.outages import REDIS_ERRORS
from llmesh.common.registry import Registry, Route
from llmesh.common.serving import InFlight, KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.common.status import error_status
from llmesh.common.tasks import cancel
from llmesh.common.tokenizers import InvalidPrompt, TokenizerCatalog, UnknownVersion
from llmesh.common.validation import InvalidRequest, bounded, shown, validate_request
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.admin import AdminService
from services.gateway.auth import QuotaExceeded, Quotas
from services.gateway.replies import PendingReplies, ReplyTimeout
from services.gateway.settings import GatewaySettings
from services.gateway.traffic import TrafficPlan, plan

REQUESTS = Counter("llmesh_gateway_requests_total", "Generate requests by outcome", ["model", "version", "code", "stream"])
LATENCY = Histogram(
    "llmesh_gateway_request_seconds",
    "Time to the last chunk",
    ["stream"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FIRST_CHUNK = Histogram(
    "llmesh_gateway_first_chunk_seconds", "Time to the first text chunk", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
)
log = logging.getLogger("llmesh.gateway")
RECORDS_IN_FLIGHT = 1024
FLEET_REFRESH_S = 0.5  # how often the gateway reads infer's heartbeats: a dead fleet is noticed this fast
# Refuse only after reading Redis this long without a failure: a restarted Redis has lost heartbeats
# that replicas beat again within HEARTBEAT_S.
FLEET_SETTLE_S = 1.5 * HEARTBEAT_S
CANCEL_SETTLE_S = 5.0  # how long a cancelled request waits for infer to count what it generated
FAILED_FAST = Counter(
    "llmesh_gateway_failed_fast_total", "Requests answered UNAVAILABLE because no infer replica could serve them", ["when"]
)
WAITING = Gauge("llmesh_gateway_waiting_requests", "Requests waiting for replies")


@dataclass
class Outcome:
    route: Route
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    first_chunk_ms: float = 0.0
    code: grpc.StatusCode = grpc.StatusCode.OK
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    shadowed: bool = False
    texts: list[str] = field(default_factory=list)  # kept only when shadowed: eval compares the answers
    generation_ms: float = 0.0
    api_key_id: str = ""
    key: ApiKey | None = None  # the caller's key, when keys are required
    held_tokens: int = 0  # of the key's token budget, until the answer is in
    prompt_tokens: int = 0
    scenario: str = ""


class GatewayService(KafkaService, gateway_pb2_grpc.GatewayServicer):
    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.settings: GatewaySettings = settings
        self.registry = Registry.from_url(settings.redis_url)
        self.keys = ApiKeyStore(self.registry.redis)
        self.quotas = Quotas(self.keys)
        self.reply_topic = topics.reply_topic(settings.gateway_id)
        self.pending = PendingReplies()
        self.records = InFlight(RECORDS_IN_FLIGHT)  # published after the answer left, off the client's path
        self.catalog = TokenizerCatalog(self.registry)
        self.fleet = FleetView()
        self._fleet_read_since: float | None = None  # loop time since which every read of the fleet succeeded
        self._watch: asyncio.Task[None] | None = None
        options = kafka.consumer_options(settings.kafka, None, from_start=True)
        kafka.subscribe(self.broker, self.reply_topic, options, self.on_reply, self.polling)
        # Every gateway sees every status (no group) so that it loads a new version's tokenizer before the swap.
        status_options = kafka.consumer_options(settings.kafka, None, control=True)
        kafka.subscribe(self.broker, topics.MODEL_STATUS, status_options, self.on_status)

    # ---- lifecycle -------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)
        gateway_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self.registry, self.broker, self.settings.release_key()), server
        )
        return [gateway_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("Gateway", "Admin")]

    def extra_topics(self) -> dict[str, int]:
        return {self.reply_topic: topics.REPLY_PARTITIONS}

    async def start(self) -> None:
        await super().start()
        with contextlib.suppress(*REDIS_ERRORS):
            await self._read_fleet()
        self._watch = asyncio.create_task(self._watch_fleet())

    async def drain(self, timeout: float) -> None:
        """In-flight RPCs were drained by the gRPC server's grace period; their records go out now."""
        await self.records.drain(timeout)

    async def stop(self) -> None:
        await cancel(self._watch)
        await super().stop()
        await self.registry.close()

    async def on_reply(self, msg: KafkaMessage) -> None:
        if (chunk := await self.dead_letters.decode(msg, events_pb2.TextChunk, self.seal)) is not None:
            self.pending.deliver(chunk)

    async def on_status(self, msg: KafkaMessage) -> None:
        if (event := await self.dead_letters.decode(msg, events_pb2.ModelStatusEvent, self.seal)) is not None:
            await self.catalog.follow(event, f"gateway-{self.settings.gateway_id}")

    async def _watch_fleet(self) -> None:
        """Read infer's heartbeats; when none beats any more, answer every waiting request
        UNAVAILABLE now rather than at its deadline (with replicas left, they take over the dead
        one's requests: services/infer/leases.py)."""
        while True:
            await asyncio.sleep(FLEET_REFRESH_S)
            try:
                await self._read_fleet()
            except REDIS_ERRORS:
                continue
            if self._fleet_settled() and not self.fleet.live and len(self.pending):
                reason = self.fleet.why_not("", 0)
                FAILED_FAST.labels("in flight").inc(self.pending.fail_all(error_status(grpc.StatusCode.UNAVAILABLE, reason)))

    async def _fleet_can_serve(self, route: Route) -> str:
        """'' when a live infer replica is ready with the route's version, else why not. The view is
        read again before refusing (it may be up to FLEET_REFRESH_S old); without Redis, no refusal."""
        if self.fleet.can_serve(route.model, route.version):
            return ""
        try:
            await self._read_fleet()
        except REDIS_ERRORS:
            return ""
        if self.fleet.can_serve(route.model, route.version) or not self._fleet_settled():
            return ""
        return self.fleet.why_not(route.model, route.version)

    async def _read_fleet(self) -> None:
        now = asyncio.get_running_loop().time()
        try:
            self.fleet = await FleetView.read(self.registry.redis)
        except REDIS_ERRORS:
            self._fleet_read_since = None
            raise
        if self._fleet_read_since is None:
            self._fleet_read_since = now

    def _fleet_settled(self) -> bool:
        since = self._fleet_read_since
        return since is not None and asyncio.get_running_loop().time() - since >= FLEET_SETTLE_S

    # ---- catalogue -------------------------------------------------------------------------

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        return gateway_pb2.ListModelsResponse(models=[await self._model_info(n) for n in await self.registry.models()])

    async def GetModel(self, request: gateway_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.ModelInfo:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        if request.name not in await self.registry.models():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {shown(request.name)} is not registered")
        return await self._model_info(request.name, with_history=True)

    async def _model_info(self, name: str, with_history: bool = False) -> gateway_pb2.ModelInfo:
        routing = await self.registry.routing(name)
        info = gateway_pb2.ModelInfo(name=name, primary_version=routing.primary, previous_version=routing.previous)
        for r in await self.registry.versions(name):
            info.versions.add(
                version=r.version,
                state=r.state_enum(),
                label=r.label,
                artifact_uri=r.artifact_uri,
                reason=r.reason,
                updated_at=r.updated_at,
            )
        for entry in await self.registry.history(name) if with_history else []:
            info.history.add(
                at=entry.at,
                version=entry.version,
                state=common_pb2.VersionState.Value(f"VERSION_STATE_{entry.state}"),
                reason=entry.reason,
            )
        return info

    # ---- generation ------------------------------------------------------------------------

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GenerateResponse:
        reply = gateway_pb2.GenerateResponse()
        parts: list[str] = []
        async for outcome, chunk in self._generate(request, context, stream=False):
            parts.append(chunk.text)
            reply.request_id, reply.model, reply.version = outcome.request_id, outcome.route.model, outcome.route.version
            if chunk.final:
                reply.finish_reason = chunk.finish_reason
                reply.usage.CopyFrom(chunk.usage)
        reply.text = "".join(parts)
        return reply

    async def GenerateStream(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        async for outcome, chunk in self._generate(request, context, stream=True):
            yield gateway_pb2.GenerateChunk(
                request_id=outcome.request_id,
                model=outcome.route.model,
                version=outcome.route.version,
                text=chunk.text,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage if chunk.final else None,
            )

    async def _generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext, *, stream: bool
    ) -> AsyncIterator[tuple[Outcome, events_pb2.TextChunk]]:
        try:
            sampling = validate_request(request, self.settings)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
        request_id = uuid.uuid4().hex
        traffic = await self._plan(request, metadata, request_id)
        if traffic is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, await self._unknown_model_message(request.model))
        assert traffic is not None
        route = traffic.answer
        try:
            prompt_ids = (await self.catalog.get(route.model, route.version)).encode_prompt(request.prompt)
        except InvalidPrompt as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except UnknownVersion as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        outcome = Outcome(route, request_id, shadowed=traffic.shadow is not None, scenario=metadata.get("x-scenario", ""))
        outcome.prompt_tokens = len(prompt_ids)
        if down := await self._fleet_can_serve(route):
            FAILED_FAST.labels("at the door").inc()
            await self._refuse(context, outcome, stream, down, code=grpc.StatusCode.UNAVAILABLE)
        if len(self.pending) >= self.settings.max_waiting:  # before the quota: a refused request costs the key nothing
            limit = f"the gateway is at its limit of {self.settings.max_waiting} requests; retry later"
            await self._refuse(context, outcome, stream, limit)
        if key := CALLER.get():
            outcome.key, outcome.api_key_id = key, key.id
            held = len(prompt_ids) + sampling.max_tokens
            try:
                await self.quotas.admit(key, held)
            except QuotaExceeded as err:
                await self._refuse(context, outcome, stream, str(err), err.trailers())
            outcome.held_tokens = held
        elif api_key := metadata.get("x-api-key"):  # keys not required: the sticky canary key, not checked
            outcome.api_key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]
        remaining = context.time_remaining()
        timeout = min(remaining, self.settings.request_timeout_s) if remaining else self.settings.request_timeout_s
        task = events_pb2.InferTask(
            request_id=outcome.request_id,
            model=route.model,
            version=route.version,
            prompt_ids=prompt_ids,
            sampling=sampling,
            stream=stream,
            deadline_unix_ms=int((time.time() + timeout) * 1000),
        )
        self.pending.open(outcome.request_id)
        WAITING.inc()
        try:
            trace = status.traceparent(metadata.get("traceparent"))  # one trace for the request and its mirror
            await self._publish(task, trace, self.reply_topic)
            if traffic.shadow is not None:
                await self._mirror(task, traffic.shadow.version, request.prompt, trace)
            deadline = asyncio.get_running_loop().time() + timeout
            async for chunk in self.pending.chunks(outcome.request_id, deadline):
                if chunk.HasField("error"):
                    outcome.code = status.status_code(chunk.error)
                    await context.abort(outcome.code, chunk.error.message)
                if not outcome.first_chunk_ms:
                    outcome.first_chunk_ms = (time.perf_counter() - outcome.started) * 1000
                    FIRST_CHUNK.observe(outcome.first_chunk_ms / 1000)
                if chunk.final:
                    outcome.usage = chunk.usage
                    outcome.generation_ms = chunk.generation_ms
                if outcome.shadowed:
                    outcome.texts.append(chunk.text)
                yield outcome, chunk
        except ReplyTimeout:
            outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED
            await context.abort(outcome.code, f"no answer from the mesh within {timeout:.1f}s")
        except asyncio.CancelledError:
            outcome.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if outcome.code == grpc.StatusCode.CANCELLED:
                await self.records.spawn(self._after_cancel(outcome, stream))
            else:
                self.pending.close(outcome.request_id)
                WAITING.dec()
                await self.records.spawn(self._record(outcome, stream, time.perf_counter() - outcome.started))

    async def _after_cancel(self, outcome: Outcome, stream: bool) -> None:
        """The client cancelled or went away: tell infer to stop, wait for its count of the tokens it
        generated, and charge the key exactly those. A unary answer arrives whole only at its end, so
        its count is unknown: it is charged what was held (as is any request infer does not settle)."""
        elapsed = time.perf_counter() - outcome.started
        final: events_pb2.TextChunk | None = None
        try:
            cancel_task = events_pb2.CancelTask(request_id=outcome.request_id, reason="the client cancelled")
            await self.outbox.send(cancel_task, topics.INFER_CANCELS, outcome.request_id, request_id=outcome.request_id)
            deadline = asyncio.get_running_loop().time() + CANCEL_SETTLE_S
            async for chunk in self.pending.chunks(outcome.request_id, deadline):
                final = chunk
        except (ReplyTimeout, KafkaError):
            log.warning("a cancelled request was not settled by infer", extra={"request_id": outcome.request_id})
        finally:
            self.pending.close(outcome.request_id)
            WAITING.dec()
        exact = final is not None and final.HasField("usage") and not final.HasField("error")
        if exact and (stream or final.finish_reason != common_pb2.FINISH_REASON_CANCELLED):  # type: ignore[union-attr]
            outcome.usage = final.usage  # type: ignore[union-attr]
        else:
            completion = max(0, outcome.held_tokens - outcome.prompt_tokens)
            outcome.usage = common_pb2.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=completion)
        await self._record(outcome, stream, elapsed)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        outcome: Outcome,
        stream: bool,
        message: str,
        trailers: tuple = (),
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        """Overload, an exhausted quota or no replica to serve: refused, counted, before any work is done."""
        outcome.code = code
        route = outcome.route
        REQUESTS.labels(route.model, str(route.version), outcome.code.name, str(stream).lower()).inc()
        await context.abort(outcome.code, message, trailing_metadata=trailers)

    async def _plan(self, request: gateway_pb2.GenerateRequest, metadata: dict[str, str], request_id: str) -> TrafficPlan | None:
        if "@" in request.model:  # a pinned version: no canary, no shadow
            pinned = await self.registry.resolve(request.model)
            return TrafficPlan(pinned) if pinned else None
        routing = await self.registry.routing(request.model)
        if not routing.primary:
            return None
        sticky = ""
        if routing.candidate_mode == "canary":  # only a canary needs the sticky key
            sticky = metadata.get("x-api-key") or hashlib.sha256(request.prompt.encode()).hexdigest()
        return plan(request.model, routing, sticky, request_id)

    async def _publish(self, task: events_pb2.InferTask, traceparent: str, reply_to: str, *, wait: bool = True) -> None:
        self.polling.touch()  # the reply will come back on the request path
        await self.outbox.task(task, reply_to, traceparent, wait=wait)

    async def _mirror(self, task: events_pb2.InferTask, version: int, prompt: str, traceparent: str) -> None:
        """Fire-and-forget copy for a shadow candidate, encoded with the candidate's own tokenizer;
        its whole answer goes to the shadow topic."""
        shadow = events_pb2.InferTask()
        shadow.CopyFrom(task)
        shadow.request_id, shadow.version, shadow.stream = task.request_id + topics.SHADOW_SUFFIX, version, False
        try:
            shadow.prompt_ids[:] = (await self.catalog.get(task.model, version)).encode_prompt(prompt)
            await self._publish(shadow, traceparent, topics.SHADOW_RESULTS, wait=False)
        except Exception:  # mirroring must never fail the client's request
            log.warning("could not mirror a request to the shadow candidate", exc_info=True)

    async def _unknown_model_message(self, alias: str) -> str:
        known = ", ".join(await self.registry.models()) or "none yet"
        return bounded(f"model {shown(alias)} is not served (known models: {known}; pin a version with name@N)")

    async def _record(self, outcome: Outcome, stream: bool, elapsed: float) -> None:
        if outcome.key is not None:
            usage = outcome.usage
            try:
                await self.quotas.settle(outcome.key, outcome.held_tokens, usage.prompt_tokens, usage.completion_tokens)
            except Exception:  # the answer is out; a lost settlement only makes the key's budget stricter
                log.warning("could not settle the key's token budget", exc_info=True)
        route = outcome.route
        REQUESTS.labels(route.model, str(route.version), outcome.code.name, str(stream).lower()).inc()
        LATENCY.labels(str(stream).lower()).observe(elapsed)
        record = events_pb2.GenerationRecord(
            request_id=outcome.request_id,
            model=route.model,
            version=route.version,
            status_code=outcome.code.value[0],
            latency_ms=elapsed * 1000,
            first_token_ms=outcome.first_chunk_ms,
            usage=outcome.usage,
            stream=stream,
            finished_at=time.time(),
            text="".join(outcome.texts),
            shadowed=outcome.shadowed,
            api_key_id=outcome.api_key_id,
            scenario=outcome.scenario,
            generation_ms=outcome.generation_ms,
        )
        try:
            await self.outbox.send(
                record, topics.GENERATE_RESULTS, outcome.request_id, request_id=outcome.request_id, no_confirm=True
            )
        except Exception:  # a lost record must not fail the client's request
            log.warning("could not publish the generation record", exc_info=True)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(GatewaySettings, argv, "gateway")
    return asyncio.run(run_service(GatewayService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
