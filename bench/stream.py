"""Streaming: time to first token and inter-token latency, straight to tritonserver vs through the
gateway's GenerateStream, one request at a time, interleaved."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import pyplot, save, summary
from bench.overhead import MODEL, VERSION, Paths, bench_prompt
from llmesh.stack.layout import StackLayout
from services.infer.repository import triton_name


async def _direct(paths: Paths, n: int) -> tuple[float, float]:
    started = time.perf_counter()
    stamps = []
    async for step in paths.triton.generate(triton_name(MODEL, VERSION), f"stream-{n}", paths.prompt_ids, paths.sampling, 120):
        if step.token_ids:
            stamps.append(time.perf_counter())
    return _ttft_itl(started, stamps, len(stamps))


async def _gateway(paths: Paths, n: int) -> tuple[float, float]:
    started = time.perf_counter()
    stamps, tokens = [], 0
    async for chunk in paths.gateway.GenerateStream(paths.request, timeout=120):
        if chunk.text:
            stamps.append(time.perf_counter())
        if chunk.usage.completion_tokens:
            tokens = chunk.usage.completion_tokens
    return _ttft_itl(started, stamps, tokens)


def _ttft_itl(started: float, stamps: list[float], tokens: int) -> tuple[float, float]:
    """Time to the first text, and the mean gap per token after it (chunks may carry several tokens)."""
    ttft = (stamps[0] - started) * 1000
    itl = (stamps[-1] - stamps[0]) * 1000 / max(1, tokens - 1)
    return ttft, itl


async def _measure(layout: StackLayout, requests: int, max_tokens: int) -> dict[str, list[tuple[float, float]]]:
    paths = Paths(layout, await bench_prompt(layout, max_tokens), max_tokens)
    out: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
    try:
        await _direct(paths, 0)
        await _gateway(paths, 0)
        for n in range(requests):
            out["direct"].append(await _direct(paths, n))
            out["gateway"].append(await _gateway(paths, n))
    finally:
        await paths.close()
    return out


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    max_tokens = 32 if quick else 64
    samples = asyncio.run(_measure(layout, 5 if quick else 40, max_tokens))
    stats = {path: {"ttft": summary([t for t, _ in s]), "itl": summary([i for _, i in s])} for path, s in samples.items()}
    d, g = stats["direct"], stats["gateway"]
    result = {
        "max_tokens": max_tokens,
        **stats,
        "ttft_p50_overhead_ms": round(g["ttft"]["p50_ms"] - d["ttft"]["p50_ms"], 2),
        "itl_p50_ratio": round(g["itl"]["p50_ms"] / d["itl"]["p50_ms"], 3) if d["itl"]["p50_ms"] else None,
    }
    plot(samples, out / "stream.png")
    return result


def plot(samples: dict[str, list[tuple[float, float]]], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(samples)
    a.boxplot([[t for t, _ in samples[n]] for n in names], showfliers=False)
    a.set_xticks(range(1, len(names) + 1), names)
    a.set_ylabel("time to first token (ms)")
    b.boxplot([[i for _, i in samples[n]] for n in names], showfliers=False)
    b.set_xticks(range(1, len(names) + 1), names)
    b.set_ylabel("inter-token latency (ms)")
    fig.suptitle(f"Streaming: direct Triton vs gateway (median ITL {statistics.median(i for _, i in samples['gateway']):.1f} ms)")
    save(fig, path, dpi=110)
