"""The gateway: the mesh's public APIs. Its data plane (services/gateway/dataplane.py) encodes each
prompt with its version's tokenizer, puts it on Kafka for infer, and streams back the replies
addressed to this gateway; the gRPC servicer here and the OpenAI-compatible HTTP API
(services/gateway/http_api.py) are thin adapters over it."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from faststream.kafka import KafkaMessage
from google.protobuf import json_format
from pydantic import ValidationError

from llmesh.common import kafka, topics
from llmesh.common.apikeys import ApiKeyStore
from llmesh.common.events import InvalidEvent
from llmesh.common.feedback import FeedbackInput
from llmesh.common.keycheck import CALLER, KeyRing, secret_of
from llmesh.common.prompts import PromptRelease, ScenarioState
from llmesh.common.registry import Registry
from llmesh.common.serving import KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.common.validation import SamplingValues, summarize
from llmesh.v1 import events_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.admin import AdminService
from services.gateway.auth import Quotas
from services.gateway.dataplane import DataPlane, GenerationError, GenerationRequest, Outcome
from services.gateway.http_api import HttpApi
from services.gateway.settings import GatewaySettings

log = logging.getLogger("llmesh.gateway")


class GatewayService(KafkaService, gateway_pb2_grpc.GatewayServicer):
    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.settings: GatewaySettings = settings
        self.registry = Registry.from_url(settings.redis_url)
        self.keys = ApiKeyStore(self.registry.redis)
        reply_topic = topics.reply_topic(settings.gateway_id)
        self.plane = DataPlane(settings, self.registry, Quotas(self.keys), self.outbox, self.polling, reply_topic)
        self.http = HttpApi(self.plane, settings, KeyRing(self.keys) if settings.api_keys_required else None)
        options = kafka.consumer_options(settings.kafka, None, from_start=True)
        kafka.subscribe(self.broker, reply_topic, options, self.on_reply, self.polling)
        # Every gateway sees every status (no group) so that it loads a new version's tokenizer before the swap.
        status_options = kafka.consumer_options(settings.kafka, None, control=True)
        kafka.subscribe(self.broker, topics.MODEL_STATUS, status_options, self.on_status)
        # Every gateway folds every prompt release into the scenarios' state (written once, by offset).
        prompt_options = kafka.consumer_options(settings.kafka, None, from_start=True, control=True)
        kafka.subscribe(self.broker, topics.PROMPTS, prompt_options, self.on_prompt_release)

    # ---- lifecycle -------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)
        gateway_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self.registry, self.broker, self.settings.release_key(), self.settings.signer_keys()), server
        )
        return [gateway_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("Gateway", "Admin")]

    def extra_topics(self) -> dict[str, int]:
        return {self.plane.reply_topic: topics.REPLY_PARTITIONS}

    async def start(self) -> None:
        await super().start()
        await self.plane.fleet.start()
        await self.http.start()

    async def stop_accepting(self, grace: float) -> None:
        await self.http.stop(grace)

    async def drain(self, timeout: float) -> None:
        """In-flight requests were drained by the servers' grace periods; their records go out now."""
        await self.plane.records.drain(timeout)

    async def stop(self) -> None:
        await self.plane.fleet.stop()
        await super().stop()
        await self.registry.close()

    async def on_reply(self, msg: KafkaMessage) -> None:
        if (chunk := await self.dead_letters.decode(msg, events_pb2.TextChunk, self.seal)) is not None:
            self.plane.pending.deliver(chunk)

    async def on_status(self, msg: KafkaMessage) -> None:
        if (event := await self.dead_letters.decode(msg, events_pb2.ModelStatusEvent, self.seal)) is not None:
            await self.plane.catalog.follow(event, f"gateway-{self.settings.gateway_id}")

    async def on_prompt_release(self, msg: KafkaMessage) -> None:
        offset = msg.raw_message.offset  # type: ignore[union-attr]
        scenarios = self.plane.scenarios
        event: PromptRelease | None = None
        try:
            event = PromptRelease.parse(msg.body)
            event.check_signature(self.settings.release_key())
            state = await scenarios.apply(event, offset)
        except InvalidEvent as err:
            if event is not None:
                await scenarios.skip(event.scenario, offset)
            if await scenarios.mark_refused(offset):
                await self.dead_letters.send(msg, str(err))
            return
        if state is not None:
            serving = f"v{state.primary}" + (f", canary v{state.candidate} at {state.share_percent}%" if state.candidate else "")
            log.info("prompt release applied", extra={"scenario": state.name, "mode": event.mode.value, "serving": serving})

    # ---- gRPC: catalogue -------------------------------------------------------------------

    async def ListScenarios(
        self, request: gateway_pb2.ListScenariosRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListScenariosResponse:
        states = [await self.plane.scenarios.get(name) for name in await self.plane.scenarios.names()]
        return gateway_pb2.ListScenariosResponse(scenarios=[_scenario_info(s) for s in states if s is not None])

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        return gateway_pb2.ListModelsResponse(models=await self.plane.models())

    async def GetModel(self, request: gateway_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.ModelInfo:
        try:
            return await self.plane.model(request.name, with_history=True)
        except GenerationError as err:
            await context.abort(err.code, err.message)
            raise

    async def SubmitFeedback(
        self, request: gateway_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.FeedbackResponse:
        try:
            given = FeedbackInput(
                request_id=request.request_id, rating=request.rating, label=request.label, comment=request.comment
            )
            return await self.plane.feedback(given, CALLER.get())
        except ValidationError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid feedback: {summarize(err)}")
            raise
        except GenerationError as err:
            await context.abort(err.code, err.message)
            raise

    # ---- gRPC: generation ------------------------------------------------------------------

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GenerateResponse:
        reply = gateway_pb2.GenerateResponse()
        parts: list[str] = []
        async for outcome, chunk in self._generate(request, context, stream=False):
            parts.append(chunk.text)
            reply.request_id, reply.model, reply.version = outcome.request_id, outcome.route.model, outcome.route.version
            reply.template_version = outcome.template_version
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
                template_version=outcome.template_version,
            )

    async def _generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext, *, stream: bool
    ) -> AsyncIterator[tuple[Outcome, events_pb2.TextChunk]]:
        metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
        generation = GenerationRequest(
            model=request.model,
            prompt=request.prompt,
            sampling=SamplingValues.from_proto(request.sampling),
            stream=stream,
            caller=CALLER.get(),
            client_key=secret_of(metadata),
            traceparent=metadata.get("traceparent"),
            scenario=request.scenario or metadata.get("x-scenario", ""),
            variables=json_format.MessageToDict(request.variables),
            timeout_s=context.time_remaining(),
        )
        try:
            async for item in self.plane.generate(generation):
                yield item
        except GenerationError as err:
            await context.abort(err.code, err.message, trailing_metadata=err.trailers())


def _scenario_info(state: ScenarioState) -> gateway_pb2.ScenarioInfo:
    info = gateway_pb2.ScenarioInfo(
        name=state.name,
        primary_version=state.primary,
        candidate_version=state.candidate,
        candidate_mode=state.candidate_mode.value if state.candidate else "",
        share_percent=state.share_percent,
    )
    for v in state.versions.values():
        info.versions.add(
            version=v.version,
            model=v.model,
            text=v.template.text,
            params={name: p.type.value for name, p in v.template.params.items()},
            tuned_for=v.template.tuned_for,
            author=v.author,
            released_at=v.released_at,
            token_budget_per_hour=v.token_budget_per_hour,
        )
    for h in state.history:
        info.history.add(at=h.at, mode=h.mode.value, version=h.version, author=h.author, reason=h.reason)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(GatewaySettings, argv, "gateway")
    return asyncio.run(run_service(GatewayService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
