"""Continuous batching: the same greedy requests straight to tritonserver (tritonclient), to the
demo model as infer serves it (continuous batching, `max_batch` 32) and to a copy of it loaded in
the same tritonserver with `max_batch` 0 (one thread per request, each its own batch of one: the
model before batching); the two interleave at each concurrency, so machine noise hits both."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import pyplot, save, summary
from bench.overhead import MODEL, VERSION, bench_prompt, closed_loop
from llmesh.stack.layout import StackLayout
from llmesh.v1 import events_pb2
from services.infer.repository import triton_name
from services.infer.triton import TritonGenerator

BATCHED = triton_name(MODEL, VERSION)
ONE_THREAD = f"{BATCHED}-one-thread"
MODES = {"batching": BATCHED, "one_thread": ONE_THREAD}


async def load_one_thread_copy(layout: StackLayout, triton: TritonGenerator) -> None:
    """The served version's Triton folder again, under another name, with max_batch 0."""
    source, target = layout.triton_repository / BATCHED, layout.triton_repository / ONE_THREAD
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    config = (target / "config.pbtxt").read_text().replace(f'name: "{BATCHED}"', f'name: "{ONE_THREAD}"')
    config, found = re.subn(r'(key: "max_batch" value: \{ string_value: )"\d+"', r'\1"0"', config)
    assert found == 1, "the served model has no max_batch parameter"
    (target / "config.pbtxt").write_text(config)
    await triton.load(ONE_THREAD)


class Client:
    def __init__(self, triton: TritonGenerator, prompt_ids: list[int], max_tokens: int) -> None:
        self.triton, self.prompt_ids = triton, prompt_ids
        self.sampling = events_pb2.ResolvedSampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)
        self.tokens = 0
        self.first_token_ms: list[float] = []

    def unary(self, name: str) -> Callable[[int], Awaitable[None]]:
        async def call(n: int) -> None:
            async for step in self.triton.generate(name, f"batching-{n}", self.prompt_ids, self.sampling, 300, stream=False):
                self.tokens += len(step.token_ids)

        return call

    def streamed(self, name: str) -> Callable[[int], Awaitable[None]]:
        async def call(n: int) -> None:
            started, first = time.perf_counter(), True
            async for _ in self.triton.generate(name, f"batching-ttft-{n}", self.prompt_ids, self.sampling, 300, stream=True):
                if first:
                    self.first_token_ms.append((time.perf_counter() - started) * 1000)
                    first = False

        return call


async def _cell(
    triton: TritonGenerator, prompt_ids: list[int], max_tokens: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    cell: dict[str, Any] = {"max_tokens": max_tokens, "concurrency": concurrency}
    rounds = 1 if concurrency * max_tokens >= 2048 else 2
    measured: dict[str, tuple[Client, list[float], list[float]]] = {
        mode: (Client(triton, prompt_ids, max_tokens), [], [0.0]) for mode in MODES
    }
    for _ in range(rounds):
        for mode, name in MODES.items():
            client, latencies, duration = measured[mode]
            lat, dur = await closed_loop(client.unary(name), concurrency, seconds / rounds)
            latencies += lat
            duration[0] += dur
    for mode, (client, latencies, duration) in measured.items():
        cell[mode] = summary(latencies, duration[0]) | {"tokens_per_s": round(client.tokens / duration[0], 1)}
    cell["tokens_per_s_ratio"] = round(cell["batching"]["tokens_per_s"] / cell["one_thread"]["tokens_per_s"], 2)
    cell["p50_ratio"] = round(cell["batching"]["p50_ms"] / cell["one_thread"]["p50_ms"], 3)
    return cell


async def _ttft(triton: TritonGenerator, prompt_ids: list[int], concurrency: int, seconds: float) -> dict[str, Any]:
    """Time to the first token of streamed requests (64 tokens) at `concurrency`, both modes interleaved."""
    clients = {mode: Client(triton, prompt_ids, 64) for mode in MODES}
    for _ in range(2):
        for mode, name in MODES.items():
            await closed_loop(clients[mode].streamed(name), concurrency, seconds / 2)
    out: dict[str, Any] = {"concurrency": concurrency}
    for mode, client in clients.items():
        out[mode] = summary(client.first_token_ms)
    out["p50_ratio"] = round(out["batching"]["p50_ms"] / out["one_thread"]["p50_ms"], 3)
    return out


async def _measure(layout: StackLayout, tokens: list[int], concurrency: list[int], seconds: float) -> dict[str, Any]:
    triton = TritonGenerator(layout.address("triton_grpc"))
    try:
        await load_one_thread_copy(layout, triton)
        cells = []
        for max_tokens in tokens:
            prompt = await bench_prompt(layout, max_tokens)
            for name in MODES.values():  # warm both
                await Client(triton, prompt.ids, max_tokens).unary(name)(0)
            for c in concurrency:
                cells.append(await _cell(triton, prompt.ids, max_tokens, c, seconds))
        ttft = await _ttft(triton, (await bench_prompt(layout, 64)).ids, 16, seconds)
        await triton.unload(ONE_THREAD)
    finally:
        await triton.close()
    return {"cells": cells, "ttft_c16": ttft}


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    tokens, concurrency, seconds = ([16], [1, 16], 3.0) if quick else ([16, 128], [1, 4, 16, 64], 8.0)
    result = asyncio.run(_measure(layout, tokens, concurrency, seconds))
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    plot(result["cells"], out / "batching.png")
    return result


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    sizes = sorted({c["max_tokens"] for c in cells})
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        rows = [c for c in cells if c["max_tokens"] == size]
        xs = [c["concurrency"] for c in rows]
        for mode, style in (("one_thread", "--"), ("batching", "-")):
            axes[0][column].plot(xs, [c[mode]["tokens_per_s"] for c in rows], style, marker="o", label=mode)
            axes[1][column].plot(xs, [c[mode]["p50_ms"] for c in rows], style, marker="o", label=f"{mode} p50")
            axes[1][column].plot(xs, [c[mode]["p99_ms"] for c in rows], style, marker="x", label=f"{mode} p99")
        axes[0][column].set_title(f"{size} new tokens: tokens/s")
        axes[1][column].set_title(f"{size} new tokens: latency (ms)")
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.legend()
    save(fig, path, dpi=110)
