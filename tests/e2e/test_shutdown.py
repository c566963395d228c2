"""SIGTERM drains: the service finishes what it has in flight, then exits 0."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from llmesh import client
from llmesh.stack import processes, stack
from llmesh.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.slow


def test_sigterm_of_infer_finishes_the_stream_in_flight_and_exits_0(mesh, gateway):
    pid = processes.pid_of(mesh, "infer")
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
    os.kill(pid, signal.SIGTERM)
    reader.join(60)
    _, status = os.waitpid(pid, 0)  # the stack's processes are children of this test process
    assert os.waitstatus_to_exitcode(status) == 0
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED, "the stream was cut"
    assert chunks[-1].usage.completion_tokens > 1
    stack.start_service(mesh, "infer")
    deadline = time.monotonic() + 60
    while client.health_status(mesh.address("infer")) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    reply = gateway.Generate(request, timeout=60)
    assert reply.text == "".join(c.text for c in chunks), "the drained answer is the whole answer"
