"""Hot swap: steady load on the gateway, a swap release in the middle, and the cost of it (failed and
mixed-version responses, time from the event to the flip, p99 during the swap vs steady state)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench.common import plot_failed, pyplot, save, summary
from llmesh import client
from llmesh.loadgen import GatewayLoad, LoadRun, Sample, wait_for_primary
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import gateway_pb2_grpc


def _figure(samples: list[Sample], name: str) -> float:
    return summary([s.latency_ms for s in samples]).get(name, 0.0)


def all_new_after(run: LoadRun, new_version: int) -> float:
    """The earliest start time after which every request was served by `new_version`."""
    old = [s.started for s in run.samples if new_version not in s.versions]
    return max(old, default=0.0)


def summarize(run: LoadRun, published: float, flipped: float, new_version: int) -> dict[str, object]:
    steady = [s for s in run.samples if s.finished < published]
    swap_window = [s for s in run.samples if s.finished >= published and s.started <= flipped + 1.0]
    after = [s for s in run.samples if s.started > flipped]
    return {
        "requests": len(run.samples),
        "failed_requests": len(run.errors),
        "mixed_version_responses": sum(len(s.versions) > 1 for s in run.samples),
        "event_to_routed_s": round(flipped - published, 3),
        "event_to_all_traffic_new_s": round(max(all_new_after(run, new_version), published) - published, 3),
        "after_flip_on_new_version": all(new_version in s.versions for s in after),
        "steady_p50_ms": _figure(steady, "p50_ms"),
        "steady_p99_ms": _figure(steady, "p99_ms"),
        "swap_window_p99_ms": _figure(swap_window, "p99_ms"),
        "after_p99_ms": _figure(after, "p99_ms"),
    }


def plot(run: LoadRun, published: float, flipped: float, path: Path) -> None:
    plt = pyplot()
    t0 = min(s.started for s in run.samples)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for version, color in ((1, "tab:blue"), (2, "tab:orange")):
        points = [s for s in run.samples if version in s.versions]
        ax.scatter(
            [s.started - t0 for s in points], [s.latency_ms for s in points], s=6, color=color, label=f"served by v{version}"
        )
    plot_failed(ax, run, t0)
    ax.axvline(published - t0, color="gray", linestyle="--", label="release event published")
    ax.axvline(flipped - t0, color="black", label="routed to v2")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Hot swap under load: gateway latency per request")
    ax.legend(loc="upper left")
    save(fig, path, dpi=120)


def run_benchmark(
    layout: StackLayout, models_dir: Path, clients: int, steady_s: float, after_s: float
) -> tuple[dict[str, object], LoadRun, float, float]:
    model = f"bench{uuid.uuid4().hex[:6]}"
    bootstrap, address = layout.address("broker"), layout.address("gateway")
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        asyncio.run(client.publish_release(bootstrap, client.release_for(model, 1, models_dir / "chat-v1")))
        wait_for_primary(stub, model, 1, timeout=120)
        with GatewayLoad(address, model, clients=clients) as load:
            time.sleep(steady_s)
            published = time.monotonic()
            asyncio.run(client.publish_release(bootstrap, client.release_for(model, 2, models_dir / "chat-v2")))
            flipped = wait_for_primary(stub, model, 2, timeout=120)
            time.sleep(after_s)
    result = summarize(load.run, published, flipped, 2) | {"model": model, "clients": clients}
    return result, load.run, published, flipped


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    """The swap with one infer replica, then with two (each loads v2 before the routing moves)."""
    steady, clients = (1.0, 2) if quick else (10.0, 4)
    result, load, published, flipped = run_benchmark(layout, layout.models_dir, clients, steady, steady)
    plot(load, published, flipped, out / "hotswap.png")
    stack.scale_infer(layout, 2, lambda _: None)
    try:
        two, load, published, flipped = run_benchmark(layout, layout.models_dir, clients, steady, steady)
    finally:
        stack.scale_infer(layout, 1, lambda _: None)
    plot(load, published, flipped, out / "hotswap_2_replicas.png")
    return result | {"two_replicas": two}
