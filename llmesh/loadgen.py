"""Bounded closed-loop load on the gateway, recording every request: used by tests and benchmarks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from llmesh import client
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PROMPTS = ("Return the number of", "This module provides", "Create a new", "The default value is")


@dataclass(frozen=True)
class Sample:
    started: float  # time.monotonic()
    finished: float
    stream: bool
    versions: frozenset[int]  # every version named by the response (one, unless versions were mixed)
    error: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1000


@dataclass
class LoadRun:
    samples: list[Sample] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error]


class GatewayLoad:
    """`clients` threads, half unary and half streaming, each sending one request after another
    (closed loop), or one every `interval_s` at most (a fixed rate when the mesh keeps up)."""

    def __init__(
        self, address: str, model: str, clients: int = 4, max_tokens: int = 8, timeout_s: float = 30.0, interval_s: float = 0.0
    ) -> None:
        self.address = address
        self.interval_s = interval_s
        self.model = model
        self.clients = clients
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.run = LoadRun()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> GatewayLoad:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i, i % 2 == 1), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def _client(self, index: int, stream: bool) -> None:
        with client.gateway_channel(self.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            n = 0
            while not self._stop.is_set():
                sampling = common_pb2.SamplingParams(max_tokens=self.max_tokens, seed=index * 100_000 + n)
                request = gateway_pb2.GenerateRequest(model=self.model, prompt=PROMPTS[n % len(PROMPTS)], sampling=sampling)
                sample = self._one(stub, request, stream)
                self.run.add(sample)
                n += 1
                if self.interval_s:
                    self._stop.wait(max(0.0, sample.started + self.interval_s - time.monotonic()))

    def _one(self, stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest, stream: bool) -> Sample:
        started = time.monotonic()
        try:
            if stream:
                versions = frozenset(chunk.version for chunk in stub.GenerateStream(request, timeout=self.timeout_s))
            else:
                versions = frozenset({stub.Generate(request, timeout=self.timeout_s).version})
        except grpc.RpcError as err:
            return Sample(started, time.monotonic(), stream, frozenset(), f"{err.code().name}: {err.details()}")
        return Sample(started, time.monotonic(), stream, versions)


def wait_for_primary(stub: gateway_pb2_grpc.GatewayStub, model: str, version: int, timeout: float = 60.0) -> float:
    """Poll GetModel until `version` is the primary; returns time.monotonic() when first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5).primary_version == version:
                return time.monotonic()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
        time.sleep(0.01)
    raise TimeoutError(f"{model} did not route to v{version} within {timeout:.0f}s")
