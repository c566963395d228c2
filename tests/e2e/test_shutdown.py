"""SIGTERM drains: each service finishes what it has in flight, then exits 0 (and the supervisor starts it again)."""

from __future__ import annotations

import os
import signal
import threading
import time

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
    first_chunk = threading.Event()
    chunks: list[gateway_pb2.GenerateChunk] = []

    def consume() -> None:
        for chunk in gateway.GenerateStream(request, timeout=60):
            chunks.append(chunk)
            first_chunk.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first_chunk.wait(30)
    signalled = time.time()
    os.kill(pid, signal.SIGTERM)
    reader.join(60)
    assert stopped_cleanly(mesh, name, pid, signalled)
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED, "the stream was cut"
    assert chunks[-1].usage.completion_tokens > 1
    wait_restarted(mesh, name, pid)  # the stack's supervisor starts it again
    reply = gateway.Generate(request, timeout=60)
    assert reply.text == "".join(c.text for c in chunks), "the drained answer is the whole answer"


@pytest.mark.parametrize("name", ["tokenize", "eval"])
def test_sigterm_of_a_service_exits_0_and_it_comes_back(mesh, name):
    pid = processes.pid_of(mesh, name)
    assert pid is not None
    signalled = time.time()
    os.kill(pid, signal.SIGTERM)
    assert stopped_cleanly(mesh, name, pid, signalled)
    wait_restarted(mesh, name, pid)  # the stack's supervisor starts it again
