"""The request path under failure and attack (issue 16): a killed infer is answered for within
seconds and comes back by itself; a Kafka client without the mesh key cannot forge an answer, a shadow result or a record."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections import Counter

import openai
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from llmesh.common import topics
from llmesh.common.seal import MeshSeal
from llmesh.loadgen import GatewayLoad
from llmesh.stack import processes, stack, supervisor
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2
from tests.e2e.kafka_tools import dead_letters_for
from tests.e2e.metrics import metric_sum
from tests.e2e.restarts import wait_restarted, wait_until_serving

pytestmark = pytest.mark.slow
ANSWER_WITHIN_S = 5.0


def test_kill_9_of_the_only_infer_is_answered_within_seconds_and_it_comes_back_by_itself(mesh):
    victim = processes.pid_of(mesh, "infer")
    assert victim is not None
    with GatewayLoad(mesh.address("gateway"), "chat", clients=4, max_tokens=24, timeout_s=60, interval_s=0.1) as load:
        time.sleep(2)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        refused = _http_refusal_while_down(mesh)
        wait_restarted(mesh, "infer", victim)  # no command: the stack's supervisor starts it again
        back_at = time.monotonic()
        deadline = back_at + 120
        while not [s for s in load.run.samples if s.started > back_at and not s.error]:
            assert time.monotonic() < deadline, "no request succeeded after infer came back"
            time.sleep(0.2)
        time.sleep(2)
    samples = load.run.samples
    codes = Counter(s.error.split(":")[0] if s.error else "OK" for s in samples)
    slowest = max(s.finished - max(s.started, killed_at) for s in samples if s.started < back_at)
    print(
        f"infer kill -9: back after {back_at - killed_at:.1f}s; outcomes {dict(codes)}; slowest answer {slowest:.2f}s after the kill"
    )
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"], "requests while infer was down were refused"
    assert slowest < ANSWER_WITHIN_S, f"a request waited {slowest:.1f}s after the kill"
    assert any("no infer replica is alive" in s.error for s in samples), "the refusal names what is down"
    assert not [s for s in samples if s.started > back_at + 1 and s.error], "after the restart every request succeeds"
    assert supervisor.restarts(mesh)["infer"]["restarts"] >= 1
    assert refused.status_code == 503 and "no infer replica is alive" in refused.message, "HTTP clients get 503 too"


def _http_refusal_while_down(mesh: StackLayout, timeout: float = 15) -> openai.APIStatusError:
    """What the OpenAI SDK raises for a request while no infer replica is alive."""
    deadline = time.monotonic() + timeout
    with openai.OpenAI(base_url=mesh.http_url(), api_key="none", max_retries=0) as client:
        while time.monotonic() < deadline:
            try:
                client.completions.create(model="chat", prompt="Return the number of", max_tokens=2, timeout=10)
            except openai.APIStatusError as err:
                return err
            time.sleep(0.1)
    raise AssertionError("no HTTP request was refused while infer was down")


def test_llmesh_up_on_a_stack_with_a_killed_process_repairs_it(mesh):
    processes.stop(mesh, "supervisor")  # so that only `llmesh up` can bring tokenize back
    victim = processes.pid_of(mesh, "tokenize")
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    while processes.alive(victim):
        time.sleep(0.05)
    said: list[str] = []
    stack.up(mesh.home, said.append)
    assert processes.pid_of(mesh, "tokenize") not in (None, victim)
    assert processes.pid_of(mesh, "supervisor") is not None
    assert any("started again: tokenize" in line for line in said), said
    wait_until_serving(mesh, "tokenize")
    assert stack.up(mesh.home, said.append) is not None and "every process of the stack is running" in said[-1]


# ---- forgery -----------------------------------------------------------------------------------


class Forger:
    """A Kafka client that may read llmesh.infer.requests and write anywhere, without the mesh key."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.forged_at = 0.0

    async def answer_the_next_request(self, ready: threading.Event, max_tokens: int) -> str:
        """Wait for the next InferTask for `max_tokens` (the victim's: other tests' stragglers, a task
        requeued after a kill, pass by) and answer it first, as a final chunk, unsealed and sealed
        with a key of its own; returns the victim's request id."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, fetch_max_wait_ms=10)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await consumer.start()
        await producer.start()
        try:
            parts = [TopicPartition(topics.INFER_REQUESTS, p) for p in range(4)]
            consumer.assign(parts)
            await consumer.seek_to_end(*parts)
            for part in parts:
                await consumer.position(part)
            ready.set()
            while True:
                record = await asyncio.wait_for(consumer.getone(), 30)
                task = events_pb2.InferTask.FromString(record.value)
                if task.sampling.max_tokens == max_tokens:
                    break
            headers = {k: v.decode() for k, v in record.headers}
            forged = events_pb2.TextChunk(
                request_id=task.request_id, model=task.model, version=task.version, text="PWNED: forged answer", final=True, seq=1
            )
            body, key, reply_to = forged.SerializeToString(), task.request_id.encode(), headers[topics.Header.REPLY_TO]
            own_seal = MeshSeal(b"the forger's own key").headers(reply_to, key, body, {})
            for extra in ({}, own_seal):
                await producer.send_and_wait(reply_to, body, key=key, headers=[(k, v.encode()) for k, v in extra.items()])
            self.forged_at = time.monotonic()
            return task.request_id
        finally:
            await consumer.stop()
            await producer.stop()

    async def publish(self, topic: str, message: events_pb2.TextChunk | events_pb2.GenerationRecord, marker: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, message.SerializeToString(), key=b"forged", headers=[("marker", marker.encode())])
        finally:
            await producer.stop()


def test_a_forged_answer_is_refused_and_the_real_one_reaches_the_client(mesh, gateway):
    forger = Forger(mesh.address("broker"))
    ready, victim = threading.Event(), {}
    refused = ("llmesh_mesh_messages_refused_total", {"topic": "llmesh.replies.*"})
    before = metric_sum(mesh.address("gateway_metrics"), refused[0], **refused[1])
    request = gateway_pb2.GenerateRequest(
        model="chat@1", prompt="Return the number of", sampling=common_pb2.SamplingParams(max_tokens=161, temperature=0.0)
    )
    attack = threading.Thread(target=lambda: victim.update(id=asyncio.run(forger.answer_the_next_request(ready, 161))))
    attack.start()
    assert ready.wait(30)
    chunks = list(gateway.GenerateStream(request, timeout=60))
    ended_at = time.monotonic()
    attack.join(30)
    text = "".join(c.text for c in chunks)
    assert victim["id"] == chunks[0].request_id and forger.forged_at < ended_at, "the forgeries arrived while the client waited"
    assert "PWNED" not in text and chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert text == gateway.Generate(request, timeout=60).text, "the client got the real answer"
    deadline = time.monotonic() + 10
    while metric_sum(mesh.address("gateway_metrics"), refused[0], **refused[1]) < before + 2:
        assert time.monotonic() < deadline, "the gateway did not count the two forgeries"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("topic", "message", "schema"),
    [
        (
            topics.SHADOW_RESULTS,
            events_pb2.TextChunk(request_id="x.shadow", model="chat", version=2, text="great", final=True),
            "TextChunk",
        ),
        (
            topics.GENERATE_RESULTS,
            events_pb2.GenerationRecord(request_id="forged-record", model="chat", version=1, latency_ms=1.0),
            "GenerationRecord",
        ),
    ],
)
def test_forged_shadow_results_and_records_are_dead_lettered_not_scored(mesh, topic, message, schema):
    marker = uuid.uuid4().hex
    found = asyncio.run(dead_letters_for(mesh.address("broker"), [(topic, message.SerializeToString(), {"marker": marker})]))
    letter = found[marker]
    assert letter["dlq-service"] == "eval" and f"{schema} refused: unsealed" in letter["dlq-reason"]
    assert metric_sum(mesh.address("eval_metrics"), "llmesh_mesh_messages_refused_total", topic=topic, reason="unsealed") >= 1
