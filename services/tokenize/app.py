"""The tokenize service: the version-exact tokenizers over gRPC (`Tokenize`, `CountTokens`), and the
Kafka entry for clients that publish text: it encodes their GenerateTasks into InferTasks. (The
gateway encodes its own requests in process: a Kafka hop costs milliseconds, encoding microseconds.)"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

import grpc
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaMessage
from prometheus_client import Counter

from llmesh.common import kafka, topics
from llmesh.common.apikeys import ApiKeyStore
from llmesh.common.registry import Registry
from llmesh.common.serving import KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.common.status import error_status
from llmesh.common.tokenizers import InvalidPrompt, TokenizerCatalog, UnknownVersion, VersionTokenizer
from llmesh.common.topics import Header
from llmesh.common.validation import SHOWN_CHARS, InvalidRequest, validate_task, validate_tokenize
from llmesh.v1 import events_pb2, tokenize_pb2, tokenize_pb2_grpc
from services.tokenize.settings import TokenizeSettings

ENCODED = Counter("llmesh_tokenize_prompt_tokens_total", "Prompt tokens encoded", ["model", "version"])
MAX_REQUEST_ID_CHARS = 128  # a Kafka key and part of Redis keys downstream
REJECTED = Counter("llmesh_tokenize_rejected_total", "Requests refused before inference", ["reason"])


class TokenizeService(KafkaService, tokenize_pb2_grpc.TokenizerServicer):
    name = "tokenize"

    def __init__(self, settings: TokenizeSettings) -> None:
        super().__init__(settings)
        self.settings: TokenizeSettings = settings
        self.registry = Registry.from_url(settings.redis_url)
        self.keys = ApiKeyStore(self.registry.redis)
        self.catalog = TokenizerCatalog(self.registry)
        opts = settings.kafka
        kafka.subscribe(
            self.broker,
            topics.GENERATE_REQUESTS,
            kafka.consumer_options(opts, topics.GROUP_TOKENIZE, from_start=True),
            self.on_generate,
            self.polling,
        )
        # Every replica sees every status (no group) so that it loads a new version's tokenizer before the swap.
        kafka.subscribe(self.broker, topics.MODEL_STATUS, kafka.consumer_options(opts, None, control=True), self.on_status)

    # ---- lifecycle -------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> list[str]:
        tokenize_pb2_grpc.add_TokenizerServicer_to_server(self, server)
        return [tokenize_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name]

    async def stop(self) -> None:
        await super().stop()
        await self.registry.close()

    # ---- gRPC ------------------------------------------------------------------------------

    async def Tokenize(
        self, request: tokenize_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenize_pb2.TokenizeResponse:
        encoding = (await self._tokenizer_for_rpc(request, context)).tokenizer.encode(request.text)
        return tokenize_pb2.TokenizeResponse(ids=encoding.ids, tokens=encoding.tokens)

    async def CountTokens(
        self, request: tokenize_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenize_pb2.CountTokensResponse:
        tokenizer = (await self._tokenizer_for_rpc(request, context)).tokenizer
        return tokenize_pb2.CountTokensResponse(count=len(tokenizer.encode(request.text).ids))

    async def _tokenizer_for_rpc(
        self, request: tokenize_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> VersionTokenizer:
        try:
            validate_tokenize(request, self.settings)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        version = request.version or await self.registry.primary(request.model)
        try:
            return await self.catalog.get(request.model, version)
        except UnknownVersion as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            raise

    # ---- Kafka: model status ----------------------------------------------------------------

    async def on_status(self, msg: KafkaMessage) -> None:
        status = await self.dead_letters.decode(msg, events_pb2.ModelStatusEvent, self.seal)
        if status is not None:
            await self.catalog.follow(status, f"tokenize-{self.settings.replica}")

    # ---- Kafka: text requests from Kafka clients --------------------------------------------

    async def on_generate(self, msg: KafkaMessage) -> None:
        task = await self.dead_letters.decode(msg, events_pb2.GenerateTask)
        if task is None:
            return
        if not 0 < len(task.request_id) <= MAX_REQUEST_ID_CHARS or not task.model or not task.version:
            await self.dead_letters.send(
                msg, f"GenerateTask lacks a request_id (1 to {MAX_REQUEST_ID_CHARS} characters), model or version"
            )
            return
        reply_to = kafka.header(msg, Header.REPLY_TO)
        if not reply_to:
            await self.dead_letters.send(msg, "GenerateTask lacks the reply-to header: no one could receive the answer")
            return
        if topics.is_mesh_topic(reply_to) or task.request_id.endswith(topics.SHADOW_SUFFIX):
            await self.dead_letters.send(msg, "GenerateTask names a mesh topic as reply-to or a mirrored request's id")
            return
        try:  # the checks of the gateway's requests, for Kafka clients too
            task.sampling.CopyFrom(validate_task(task, self.settings))
        except InvalidRequest as err:
            await self._reject(task, reply_to, grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return
        if kafka.expired(msg) or 0 < task.deadline_unix_ms <= time.time() * 1000:
            await self._reject(task, reply_to, grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before encoding")
            return
        await self.in_flight.spawn(self._encode(task, reply_to, kafka.header(msg, Header.TRACEPARENT)))

    async def _encode(self, task: events_pb2.GenerateTask, reply_to: str, traceparent: str) -> None:
        try:
            ids = (await self.catalog.get(task.model, task.version)).encode_prompt(task.prompt)
        except UnknownVersion as err:
            await self._reject(task, reply_to, grpc.StatusCode.NOT_FOUND, str(err))
            return
        except InvalidPrompt as err:
            await self._reject(task, reply_to, grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return
        ENCODED.labels(task.model, str(task.version)).inc(len(ids))
        infer = events_pb2.InferTask(
            request_id=task.request_id,
            model=task.model,
            version=task.version,
            prompt_ids=ids,
            sampling=task.sampling,
            stream=task.stream,
            deadline_unix_ms=task.deadline_unix_ms,
        )
        try:
            await self.outbox.task(infer, reply_to, traceparent)
        except KafkaError as err:
            message = f"the broker did not take the task ({type(err).__name__}); retry"
            await self._reject(task, reply_to, grpc.StatusCode.UNAVAILABLE, message)

    async def _reject(self, task: events_pb2.GenerateTask, reply_to: str, code: grpc.StatusCode, message: str) -> None:
        REJECTED.labels(code.name).inc()
        chunk = events_pb2.TextChunk(
            request_id=task.request_id,
            model=task.model[:SHOWN_CHARS],  # a refused name may be huge: the message names it, cut
            version=task.version,
            final=True,
            error=error_status(code, message),
        )
        await self.outbox.send(chunk, reply_to, chunk.request_id, request_id=chunk.request_id)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(TokenizeSettings, argv, "tokenize")
    return asyncio.run(run_service(TokenizeService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
