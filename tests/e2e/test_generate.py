"""Through the public gateway: gateway -> Kafka -> tokenize -> infer (Triton) -> tokenize -> gateway."""

from __future__ import annotations

import time

import pytest

from llmesh.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.slow


def _request(prompt: str = "Return the number of", **sampling: object) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(model="chat", prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]


def test_unary_generate_returns_model_text(gateway):
    reply = gateway.Generate(_request(max_tokens=24, seed=1, temperature=0.8), timeout=60)
    assert reply.model == "chat" and reply.version == 1
    assert reply.text.strip(), "the model produced no text"
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.prompt_tokens >= 1
    assert reply.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)


def test_same_seed_same_text_and_other_seed_differs(gateway):
    first = gateway.Generate(_request(max_tokens=32, seed=42), timeout=60).text
    again = gateway.Generate(_request(max_tokens=32, seed=42), timeout=60).text
    other = gateway.Generate(_request(max_tokens=32, seed=43), timeout=60).text
    assert first == again
    assert first != other


def test_stream_arrives_token_by_token_and_equals_unary(gateway):
    unary = gateway.Generate(_request(max_tokens=64, seed=7, temperature=0.9), timeout=60)
    started = time.perf_counter()
    arrivals, chunks = [], []
    for chunk in gateway.GenerateStream(_request(max_tokens=64, seed=7, temperature=0.9), timeout=60):
        arrivals.append(time.perf_counter() - started)
        chunks.append(chunk)
    assert "".join(c.text for c in chunks) == unary.text
    assert len(chunks) >= 10, "tokens were not streamed one by one"
    assert arrivals[0] < arrivals[-1] / 3, f"first chunk at {arrivals[0]:.3f}s, last at {arrivals[-1]:.3f}s"
    last = chunks[-1]
    assert last.finish_reason == unary.finish_reason
    assert last.usage.completion_tokens == unary.usage.completion_tokens
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert {c.version for c in chunks} == {1}


def test_greedy_decoding_is_deterministic_without_seed(gateway):
    a = gateway.Generate(_request(max_tokens=16, temperature=0.0), timeout=60).text
    b = gateway.Generate(_request(max_tokens=16, temperature=0.0), timeout=60).text
    assert a == b


def test_stop_string_ends_the_answer_before_it(gateway):
    free = gateway.Generate(_request(max_tokens=64, seed=3), timeout=60).text
    stop = next(ch for ch in free[4:] if not ch.isspace())  # a character the model will produce
    reply = gateway.Generate(_request(max_tokens=64, seed=3, stop=[stop]), timeout=60)
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP
    assert stop not in reply.text
    assert free.startswith(reply.text)


def test_pinned_version_is_served(gateway):
    reply = gateway.Generate(
        gateway_pb2.GenerateRequest(model="chat@1", prompt="The", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=60
    )
    assert reply.version == 1


def test_catalogue_lists_the_serving_version(gateway):
    listed = gateway.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    info = gateway.GetModel(gateway_pb2.GetModelRequest(name="chat"), timeout=10)
    assert "chat" in [m.name for m in listed.models]
    assert info.primary_version == 1
    assert info.versions[0].state == common_pb2.VERSION_STATE_SERVING
    assert info.versions[0].artifact_uri.startswith("file://")


def test_headers_carry_request_id_and_the_clients_traceparent(mesh, gateway):
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from llmesh.common import topics

    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    async def run() -> dict[str, dict[str, str]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=mesh.address("broker"), fetch_max_wait_ms=20)
        await consumer.start()
        try:
            parts = [TopicPartition(t, p) for t in (topics.INFER_REQUESTS, topics.INFER_TOKENS) for p in range(4)]
            consumer.assign(parts)
            await consumer.seek_to_end(*parts)
            for tp in parts:
                await consumer.position(tp)
            reply = await asyncio.to_thread(
                gateway.Generate, _request(max_tokens=4), timeout=30, metadata=[("traceparent", trace)]
            )
            seen: dict[str, dict[str, str]] = {}
            async with asyncio.timeout(10):
                while len(seen) < 2:
                    for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                        for r in records:
                            headers = {k: v.decode() for k, v in r.headers}
                            if headers.get("request-id") == reply.request_id:
                                seen[tp.topic] = headers
            return seen
        finally:
            await consumer.stop()

    seen = asyncio.run(run())
    for headers in seen.values():
        assert headers["traceparent"] == trace
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["schema"].startswith("llmesh.v1.")
