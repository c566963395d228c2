"""Mesh overhead: the same greedy requests straight to tritonserver (tritonclient gRPC, the baseline),
through the gateway's gRPC API and through its OpenAI-compatible HTTP API (/v1/completions, a
keep-alive HTTP/1.1 client), at several concurrencies and lengths; and the bare broker round trip,
so that the mesh's own cost per Kafka hop can be told apart from the broker's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2

from bench.broker_rtt import round_trips
from bench.common import PROMPT, pyplot, save, summary
from llmesh.common.settings import KafkaSettings
from llmesh.loadgen import PROMPTS
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc, tokenize_pb2, tokenize_pb2_grpc
from services.infer.repository import triton_name
from services.infer.triton import TritonGenerator

MODEL, VERSION = "chat", 1
HOPS = 2  # gateway -> infer -> gateway


async def closed_loop(call: Callable[[int], Awaitable[None]], concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` workers calling `call` one after another for `seconds`; latencies and duration."""
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker(index: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await call(index * 1_000_000 + n)
            latencies.append((time.perf_counter() - t) * 1000)
            n += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - started


class Paths:
    """The three ways to the same model version, sharing sampling settings."""

    def __init__(self, layout: StackLayout, prompt: Prompt, max_tokens: int) -> None:
        self.triton = TritonGenerator(layout.address("triton_grpc"))
        self.channel = grpc.aio.insecure_channel(layout.address("gateway"))
        self.gateway = gateway_pb2_grpc.GatewayStub(self.channel)
        self.prompt_ids = prompt.ids
        self.sampling = events_pb2.ResolvedSampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)
        params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)
        self.request = gateway_pb2.GenerateRequest(model=f"{MODEL}@{VERSION}", prompt=prompt.text, sampling=params)
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=256)
        self.http_client = httpx2.AsyncClient(base_url=layout.http_url(), timeout=120, limits=limits)
        self.http_body = {
            "model": f"{MODEL}@{VERSION}",
            "prompt": prompt.text,
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": 1,
        }

    async def direct(self, n: int) -> None:
        async for _ in self.triton.generate(
            triton_name(MODEL, VERSION), f"bench-{n}", self.prompt_ids, self.sampling, 120, stream=False
        ):
            pass

    async def mesh(self, n: int) -> None:
        await self.gateway.Generate(self.request, timeout=120)

    async def http(self, n: int) -> None:
        (await self.http_client.post("/completions", json=self.http_body)).raise_for_status()

    def by_name(self) -> dict[str, Callable[[int], Awaitable[None]]]:
        return {"direct": self.direct, "gateway": self.mesh, "http": self.http}

    async def close(self) -> None:
        await self.triton.close()
        await self.channel.close()
        await self.http_client.aclose()


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]


async def bench_prompt(layout: StackLayout, max_tokens: int) -> Prompt:
    """The first of the candidate prompts whose greedy answer runs to `max_tokens` (else the one
    that runs longest): an answer that ends at once on EOS measures no inter-token latency. Which
    one it is depends on the demo model's build (its training is seeded, its float sums are not)."""
    with grpc.insecure_channel(layout.address("tokenize")) as channel:
        stub = tokenize_pb2_grpc.TokenizerStub(channel)
        candidates = [
            Prompt(
                text, list(stub.Tokenize(tokenize_pb2.TokenizeRequest(model=MODEL, version=VERSION, text=text), timeout=10).ids)
            )
            for text in (PROMPT, *PROMPTS)
        ]
    lengths = await _answer_lengths(layout, candidates, max_tokens)
    reaching = [c for c, n in zip(candidates, lengths, strict=True) if n >= max_tokens]
    return reaching[0] if reaching else candidates[max(range(len(candidates)), key=lambda i: lengths[i])]


async def _answer_lengths(layout: StackLayout, candidates: list[Prompt], max_tokens: int) -> list[int]:
    triton = TritonGenerator(layout.address("triton_grpc"))
    sampling = events_pb2.ResolvedSampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)
    lengths = []
    try:
        for n, candidate in enumerate(candidates):
            steps = triton.generate(triton_name(MODEL, VERSION), f"probe-{n}", candidate.ids, sampling, 120, stream=False)
            lengths.append(sum([len(step.token_ids) async for step in steps]))
    finally:
        await triton.close()
    return lengths


async def _cell(paths: Paths, concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {name: [] for name in paths.by_name()}
    durations = dict.fromkeys(latencies, 0.0)
    # Interleaved rounds, so that machine noise hits every path; one round when a round already takes
    # long (every worker finishes its last request, and 64 requests of 128 tokens take tens of seconds).
    rounds = 1 if concurrency * paths.sampling.max_tokens >= 2048 else 2
    for _ in range(rounds):
        for name, call in paths.by_name().items():
            lat, dur = await closed_loop(call, concurrency, seconds / rounds)
            latencies[name] += lat
            durations[name] += dur
    d, g, h = (summary(latencies[name], durations[name]) for name in ("direct", "gateway", "http"))
    return {
        "concurrency": concurrency,
        "direct": d,
        "gateway": g,
        "http": h,
        "p50_overhead_ms": round(g["p50_ms"] - d["p50_ms"], 2),
        "p99_overhead_ms": round(g["p99_ms"] - d["p99_ms"], 2),
        "throughput_ratio": round(g["per_s"] / d["per_s"], 3),
        "http_p50_overhead_ms": round(h["p50_ms"] - d["p50_ms"], 2),
        "http_p99_overhead_ms": round(h["p99_ms"] - d["p99_ms"], 2),
        "http_minus_grpc_p50_ms": round(h["p50_ms"] - g["p50_ms"], 2),
        "http_throughput_ratio": round(h["per_s"] / d["per_s"], 3),
    }


async def _grid(layout: StackLayout, tokens: list[int], concurrency: list[int], seconds: float) -> list[dict[str, Any]]:
    cells = []
    for max_tokens in tokens:
        paths = Paths(layout, await bench_prompt(layout, max_tokens), max_tokens)
        try:
            for _ in range(3):  # warm every path
                for call in paths.by_name().values():
                    await call(0)
            for c in concurrency:
                cells.append({"max_tokens": max_tokens} | await _cell(paths, c, seconds))
        finally:
            await paths.close()
    return cells


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    tokens, concurrency, seconds = ([16], [1, 4], 2.0) if quick else ([16, 128], [1, 4, 16, 64], 6.0)
    kafka = KafkaSettings(bootstrap=layout.address("broker"))
    rtt = summary(asyncio.run(round_trips(kafka, 50 if quick else 300)))
    cells = asyncio.run(_grid(layout, tokens, concurrency, seconds))
    first = cells[0]
    per_hop = (first["gateway"]["p50_ms"] - first["direct"]["p50_ms"]) / HOPS
    result = {
        "broker_round_trip": rtt | {"fetch_max_wait_ms": kafka.fetch_max_wait_ms},
        "mesh_cost_per_hop_p50_ms": round(per_hop, 2),
        "mesh_cost_per_hop_beyond_broker_ms": round(per_hop - rtt["p50_ms"], 2),
        "cells": cells,
    }
    plot(cells, out / "overhead.png")
    return result


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    sizes = sorted({c["max_tokens"] for c in cells})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = [c for c in cells if c["max_tokens"] == size]
        xs = [c["concurrency"] for c in rows]
        for path_name, style in (("direct", "--"), ("gateway", "-"), ("http", ":")):
            for q in ("p50_ms", "p99_ms"):
                ax.plot(xs, [c[path_name][q] for c in rows], style, marker="o", label=f"{path_name} {q[:3]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{size} new tokens: direct Triton vs gateway gRPC and HTTP")
        ax.legend()
    save(fig, path, dpi=110)
