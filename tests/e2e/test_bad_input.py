"""Bad input to the gateway gets the right status and a message that says what to fix; bad Kafka
messages go to the dead-letter topic with their reason; nothing stops serving."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import pytest

from llmesh.common import topics
from llmesh.common.seal import MeshSeal
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2
from tests.e2e.kafka_tools import dead_letters_for

pytestmark = pytest.mark.slow
S = common_pb2.SamplingParams


@pytest.mark.parametrize(
    ("model", "prompt", "sampling", "code", "message"),
    [
        ("chat", "", S(), grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty"),
        ("chat", "x" * 9000, S(), grpc.StatusCode.INVALID_ARGUMENT, "prompt is 9000 characters; the limit is 8192"),
        ("", "hello", S(), grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
        ("chat", "hello", S(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens must be between 1 and 512"),
        (
            "chat",
            "hello",
            S(max_tokens=100000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens must be between 1 and 512",
        ),
        ("chat", "hello", S(temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature must be between 0"),
        ("chat", "hello", S(top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p must be in (0, 1]"),
        ("chat", "hello", S(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "each stop string must have 1 to"),
        ("nope", "hello", S(), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served (known models: "),
        ("chat@9", "hello", S(), grpc.StatusCode.NOT_FOUND, "model 'chat@9' is not served"),
        ("chat", "word " * 600, S(), grpc.StatusCode.INVALID_ARGUMENT, "tokens; model chat@1 takes at most 255"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_request_gets_status_and_message(gateway, model, prompt, sampling, code, message, stream):
    request = gateway_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling)
    with pytest.raises(grpc.RpcError) as caught:
        if stream:
            list(gateway.GenerateStream(request, timeout=30))
        else:
            gateway.Generate(request, timeout=30)
    assert caught.value.code() == code
    assert message in caught.value.details()


def test_a_request_over_the_grpc_size_limit_is_refused_before_any_work(gateway):
    request = gateway_pb2.GenerateRequest(model="chat", prompt="x" * (5 << 20))
    with pytest.raises(grpc.RpcError) as refused:
        gateway.Generate(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gateway.Generate(gateway_pb2.GenerateRequest(model="chat", prompt="Return"), timeout=30).text is not None


def test_a_short_client_deadline_ends_the_call_on_time(gateway):
    import time

    request = gateway_pb2.GenerateRequest(model="chat", prompt="Return", sampling=S(max_tokens=512, temperature=0.0))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        gateway.Generate(request, timeout=0.15)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0
    assert gateway.Generate(gateway_pb2.GenerateRequest(model="chat", prompt="Return"), timeout=30).text is not None


def test_get_unknown_model_is_not_found(gateway):
    with pytest.raises(grpc.RpcError) as caught:
        gateway.GetModel(gateway_pb2.GetModelRequest(name="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_malformed_kafka_messages_go_to_the_dead_letter_topic(mesh, gateway):
    protobuf = {"content-type": topics.CONTENT_TYPE_PROTOBUF}
    unanswerable = events_pb2.InferTask(request_id="r1", model="chat", version=1, prompt_ids=[1]).SerializeToString()
    mesh_key, forged_key = mesh.mesh_key().encode(), b"a key the mesh does not hold"
    cases = [  # (topic, payload, headers, sealed with, reason)
        (topics.GENERATE_REQUESTS, b"\xff\xfe not protobuf", protobuf, None, "undecodable GenerateTask"),
        (topics.INFER_REQUESTS, b"\xff\xfe not protobuf", protobuf, None, "InferTask refused: unsealed"),
        (topics.INFER_REQUESTS, b"\xff\xfe not protobuf", protobuf, mesh_key, "undecodable InferTask"),
        (topics.INFER_REQUESTS, unanswerable, protobuf, forged_key, "InferTask refused: bad seal"),
        (topics.INFER_REQUESTS, unanswerable, protobuf, mesh_key, "lacks the reply-to header"),
        (
            topics.RELEASES,
            json.dumps({"model": "chat", "version": "x"}).encode(),
            {"content-type": "application/json"},
            None,
            "invalid release event",
        ),
    ]
    sends = []
    for topic, payload, headers, key, _ in cases:
        marker = uuid.uuid4().hex
        marked = headers | {"marker": marker}
        sends.append((topic, payload, MeshSeal(key).headers(topic, marker.encode(), payload, marked) if key else marked))
    found = asyncio.run(dead_letters_for(mesh.address("broker"), sends))
    for (topic, payload, headers), (*_, reason) in zip(sends, cases, strict=True):
        letter = found[headers["marker"]]
        assert letter["dlq-original-topic"] == topic
        assert reason in letter["dlq-reason"]
        assert letter["payload"] == payload.decode(errors="replace")
    # and serving goes on
    reply = gateway.Generate(gateway_pb2.GenerateRequest(model="chat", prompt="The", sampling=S(max_tokens=4)), timeout=30)
    assert reply.version == 1 and reply.usage.completion_tokens >= 1
