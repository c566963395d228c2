"""Scale-out: gateway throughput with one infer replica, then with a second one (its own
tritonserver) in the same consumer group, at the same closed-loop load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import pyplot, save, summary
from bench.overhead import Paths, bench_prompt, closed_loop
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import infer_pb2, infer_pb2_grpc

SECOND = "infer-2"


def _throughput(layout: StackLayout, concurrency: int, seconds: float) -> dict[str, float]:
    async def measure() -> dict[str, float]:
        paths = Paths(layout, await bench_prompt(layout, 16), 16)
        try:
            await paths.mesh(0)
            latencies, duration = await closed_loop(paths.mesh, concurrency, seconds)
        finally:
            await paths.close()
        return summary(latencies, duration)

    return asyncio.run(measure())


def _check_loaded(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        loaded = infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), timeout=10)
    assert any(v.model == "chat" for v in loaded.versions), f"{SECOND} has not loaded chat"
    time.sleep(5)  # the group rebalances: partitions move to the new member


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    concurrency, seconds = (4, 3.0) if quick else (8, 15.0)
    one = _throughput(layout, concurrency, seconds)
    try:
        stack.scale_infer(layout, 2, lambda _: None)
        _check_loaded(f"127.0.0.1:{stack.extra_replicas(layout)[SECOND]['grpc']}")
        two = _throughput(layout, concurrency, seconds)
    finally:
        stack.scale_infer(layout, 1, lambda _: None)
    result = {
        "concurrency": concurrency,
        "max_tokens": 16,
        "one_replica": one,
        "two_replicas": two,
        "throughput_ratio_2_vs_1": round(two["per_s"] / one["per_s"], 3),
    }
    plot(result, out / "scale.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(["1 infer replica", "2 infer replicas"], [result["one_replica"]["per_s"], result["two_replicas"]["per_s"]])
    ax.set_ylabel("requests per second")
    ax.set_title(f"Scale-out at concurrency {result['concurrency']} (ratio {result['throughput_ratio_2_vs_1']})")
    save(fig, path, dpi=110)
