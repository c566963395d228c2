"""SIGTERM drains: each service finishes what it has in flight, then exits 0 (and the supervisor starts it again)."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest

from llmesh.stack import processes
from llmesh.v1 import common_pb2, gateway_pb2
from tests.e2e.restarts import stopped_cleanly, wait_restarted

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["infer", "gateway"])
def test_sigterm_finishes_the_stream_in_flight_and_exits_0(mesh, gateway, name):
    pid = processes.pid_of(mesh, name)
    assert pid is not None
    request = gateway_pb2.GenerateRequest(
        model="chat@1", prompt="Return the", sampling=common_pb2.SamplingParams(max_tokens=160, temperature=0.0)
    )
    started = threading.Barrier(3)
    chunks: list[gateway_pb2.GenerateChunk] = []
    events: list[openai.types.Completion] = []  # the same request through the HTTP API, as Server-Sent Events

    def consume() -> None:
        for n, chunk in enumerate(gateway.GenerateStream(request, timeout=60)):
            chunks.append(chunk)
            if n == 0:
                started.wait(30)

    def consume_http() -> None:
        with openai.OpenAI(base_url=mesh.http_url(), api_key="none", max_retries=0) as client:
            stream = client.completions.create(model="chat@1", prompt="Return the", max_tokens=160, temperature=0, stream=True)
            for n, event in enumerate(stream):
                events.append(event)
                if n == 0:
                    started.wait(30)

    readers = [threading.Thread(target=consume), threading.Thread(target=consume_http)]
    for reader in readers:
        reader.start()
    started.wait(30)  # both streams are under way
    signalled = time.time()
    os.kill(pid, signal.SIGTERM)
    for reader in readers:
        reader.join(60)
    assert stopped_cleanly(mesh, name, pid, signalled)
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED, "the stream was cut"
    assert chunks[-1].usage.completion_tokens > 1
    assert events and events[-1].choices[0].finish_reason is not None, "the HTTP stream was cut"
    wait_restarted(mesh, name, pid)  # the stack's supervisor starts it again
    reply = gateway.Generate(request, timeout=60)
    assert reply.text == "".join(c.text for c in chunks), "the drained answer is the whole answer"
    assert reply.text == "".join(e.choices[0].text for e in events), "the drained HTTP answer is the whole answer"


@pytest.mark.parametrize("name", ["tokenize", "eval"])
def test_sigterm_of_a_service_exits_0_and_it_comes_back(mesh, name):
    pid = processes.pid_of(mesh, name)
    assert pid is not None
    signalled = time.time()
    os.kill(pid, signal.SIGTERM)
    assert stopped_cleanly(mesh, name, pid, signalled)
    wait_restarted(mesh, name, pid)  # the stack's supervisor starts it again
