"""The tokenize service: encodes prompts on the way in, decodes token streams on the way out."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence

import grpc
from faststream.kafka import KafkaMessage
from prometheus_client import Counter

from llmesh.common import kafka, topics
from llmesh.common.registry import Registry
from llmesh.common.serving import KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.common.status import error_status
from llmesh.common.topics import Header
from llmesh.v1 import common_pb2, events_pb2, tokenize_pb2, tokenize_pb2_grpc
from services.tokenize.catalog import TokenizerCatalog, UnknownVersion
from services.tokenize.detokenizer import StreamDecoder
from services.tokenize.settings import TokenizeSettings

ENCODED = Counter("llmesh_tokenize_prompt_tokens_total", "Prompt tokens encoded", ["model", "version"])
DECODED = Counter("llmesh_tokenize_completion_tokens_total", "Generated tokens decoded", ["model", "version"])
REJECTED = Counter("llmesh_tokenize_rejected_total", "Requests refused before inference", ["reason"])

DECODER_TTL_S = 600.0
log = logging.getLogger("llmesh.tokenize")


class TokenizeService(KafkaService, tokenize_pb2_grpc.TokenizerServicer):
    name = "tokenize"

    def __init__(self, settings: TokenizeSettings) -> None:
        super().__init__(settings)
        self.settings: TokenizeSettings = settings
        self.registry = Registry.from_url(settings.redis_url)
        self.catalog = TokenizerCatalog(self.registry)
        self.decoders: dict[str, tuple[StreamDecoder, float]] = {}
        opts = settings.kafka
        kafka.subscribe(
            self.broker,
            topics.GENERATE_REQUESTS,
            kafka.consumer_options(opts, topics.GROUP_TOKENIZE),
            self.on_generate,
            self.polling,
        )
        kafka.subscribe(
            self.broker,
            topics.INFER_TOKENS,
            kafka.consumer_options(opts, f"{topics.GROUP_TOKENIZE}-detok"),
            self.on_tokens,
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

    async def _tokenizer_for_rpc(self, request: tokenize_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        version = request.version or await self.registry.primary(request.model)
        try:
            return await self.catalog.get(request.model, version)
        except UnknownVersion as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            raise

    # ---- Kafka: model status ----------------------------------------------------------------

    async def on_status(self, msg: KafkaMessage) -> None:
        status = await self.dead_letters.decode(msg, events_pb2.ModelStatusEvent)
        if status is None:
            return
        if status.state == common_pb2.VERSION_STATE_STAGED:
            try:
                await self.catalog.get(status.model, status.version)
            except (UnknownVersion, OSError, ValueError) as err:
                log.warning(
                    "could not preload a tokenizer", extra={"model": status.model, "version": status.version, "error": str(err)}
                )
                return
            await self.registry.mark_tokenizer_loaded(status.model, status.version, self.settings.replica)

    # ---- Kafka: prompts in -----------------------------------------------------------------

    async def on_generate(self, msg: KafkaMessage) -> None:
        task = await self.dead_letters.decode(msg, events_pb2.GenerateTask)
        if task is None:
            return
        if not task.request_id or not task.model or not task.version:
            await self.dead_letters.send(msg, "GenerateTask lacks request_id, model or version")
            return
        await self.in_flight.spawn(self._encode(task, kafka.header(msg, Header.REPLY_TO), msg))

    async def _encode(self, task: events_pb2.GenerateTask, reply_to: str, msg: KafkaMessage) -> None:
        traceparent = kafka.header(msg, Header.TRACEPARENT)
        try:
            version = await self.catalog.get(task.model, task.version)
        except UnknownVersion as err:
            await self._reject(task, reply_to, grpc.StatusCode.NOT_FOUND, str(err))
            return
        ids = version.tokenizer.encode(task.prompt).ids
        if not ids:
            await self._reject(task, reply_to, grpc.StatusCode.INVALID_ARGUMENT, "prompt encodes to no tokens")
            return
        if len(ids) >= version.context:
            msg_text = f"prompt is {len(ids)} tokens; model {task.model}@{task.version} takes at most {version.context - 1}"
            await self._reject(task, reply_to, grpc.StatusCode.INVALID_ARGUMENT, msg_text)
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
        headers = kafka.headers_for(infer, task.request_id, **{Header.REPLY_TO: reply_to, Header.TRACEPARENT: traceparent})
        await self.broker.publish(infer.SerializeToString(), topics.INFER_REQUESTS, key=task.request_id.encode(), headers=headers)

    async def _reject(self, task: events_pb2.GenerateTask, reply_to: str, code: grpc.StatusCode, message: str) -> None:
        REJECTED.labels(code.name).inc()
        chunk = events_pb2.TextChunk(
            request_id=task.request_id,
            model=task.model,
            version=task.version,
            final=True,
            error=error_status(code, message),
        )
        await self._reply(chunk, reply_to)

    async def _reply(self, chunk: events_pb2.TextChunk, reply_to: str) -> None:
        if reply_to:
            headers = kafka.headers_for(chunk, chunk.request_id)
            await self.broker.publish(chunk.SerializeToString(), reply_to, key=chunk.request_id.encode(), headers=headers)

    # ---- Kafka: tokens out -----------------------------------------------------------------

    async def on_tokens(self, msg: KafkaMessage) -> None:
        chunk = await self.dead_letters.decode(msg, events_pb2.TokenChunk)
        if chunk is None:
            return
        if not chunk.request_id:
            await self.dead_letters.send(msg, "TokenChunk lacks request_id")
            return
        # Decoded inline (not spawned) so the chunks of one request keep their order.
        await self._decode(chunk, kafka.header(msg, Header.REPLY_TO))

    async def _decode(self, chunk: events_pb2.TokenChunk, reply_to: str) -> None:
        out = events_pb2.TextChunk(request_id=chunk.request_id, model=chunk.model, version=chunk.version, final=chunk.final)
        if chunk.HasField("error"):
            self.decoders.pop(chunk.request_id, None)
            out.error.CopyFrom(chunk.error)
            await self._reply(out, reply_to)
            return
        decoder = await self._decoder(chunk)
        if decoder is None:
            out.final = True
            out.error.CopyFrom(error_status(grpc.StatusCode.NOT_FOUND, "unknown model version"))
            await self._reply(out, reply_to)
            return
        DECODED.labels(chunk.model, str(chunk.version)).inc(len(chunk.token_ids))
        out.text = decoder.push(list(chunk.token_ids))
        if chunk.final:
            out.text += decoder.finish()
            self.decoders.pop(chunk.request_id, None)
            stopped = decoder.stopped or chunk.finish_reason == common_pb2.FINISH_REASON_STOP
            out.finish_reason = common_pb2.FINISH_REASON_STOP if stopped else chunk.finish_reason
            out.usage.CopyFrom(common_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=len(decoder.ids)))
            out.generation_ms = chunk.generation_ms
        if out.text or out.final:
            await self._reply(out, reply_to)

    async def _decoder(self, chunk: events_pb2.TokenChunk) -> StreamDecoder | None:
        now = time.monotonic()
        if found := self.decoders.get(chunk.request_id):
            return found[0]
        try:
            version = await self.catalog.get(chunk.model, chunk.version)
        except UnknownVersion:
            return None
        decoder = StreamDecoder(version.tokenizer, list(chunk.stop))
        self._expire_decoders(now)
        if not chunk.final:
            self.decoders[chunk.request_id] = (decoder, now)
        return decoder

    def _expire_decoders(self, now: float) -> None:
        stale = [rid for rid, (_, born) in self.decoders.items() if now - born > DECODER_TTL_S]
        for rid in stale:
            del self.decoders[rid]


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(TokenizeSettings, argv, "tokenize")
    return asyncio.run(run_service(TokenizeService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
