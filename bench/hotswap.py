"""Hot-swap benchmark: steady load on the gateway, a swap release in the middle, and the cost of it.

    python bench/hotswap.py [--home DIR] [--clients 4] [--steady 10] [--after 10] [--out bench/results]

Uses the stack in --home if one runs there, otherwise starts its own (free ports) and stops it after.
Writes hotswap.json and hotswap.png (latency over time, swap marked) under --out, prints the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from llmesh import client
from llmesh.loadgen import GatewayLoad, LoadRun, Sample, wait_for_primary
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import gateway_pb2_grpc


def _p99(samples: list[Sample]) -> float:
    ordered = sorted(s.latency_ms for s in samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2) if ordered else 0.0


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
        "steady_p50_ms": round(statistics.median(s.latency_ms for s in steady), 2) if steady else 0.0,
        "steady_p99_ms": _p99(steady),
        "swap_window_p99_ms": _p99(swap_window),
        "after_p99_ms": _p99(after),
    }


def plot(run: LoadRun, published: float, flipped: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s.started for s in run.samples)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for version, color in ((1, "tab:blue"), (2, "tab:orange")):
        points = [s for s in run.samples if version in s.versions]
        ax.scatter(
            [s.started - t0 for s in points], [s.latency_ms for s in points], s=6, color=color, label=f"served by v{version}"
        )
    if run.errors:
        ax.scatter(
            [s.started - t0 for s in run.errors],
            [s.latency_ms for s in run.errors],
            s=20,
            color="red",
            marker="x",
            label="failed",
        )
    ax.axvline(published - t0, color="gray", linestyle="--", label="release event published")
    ax.axvline(flipped - t0, color="black", label="routed to v2")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Hot swap under load: gateway latency per request")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--models-dir", type=Path, default=Path(".llmesh/models"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    layout = StackLayout.load(args.home.resolve()) if args.home else None
    own_home = None
    if layout is None or not stack.running(layout):
        own_home = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
        layout = stack.up(own_home, print, free_ports=True, models_dir=args.models_dir.resolve())
    try:
        result, run, published, flipped = run_benchmark(layout, layout.models_dir, args.clients, args.steady, args.after)
    finally:
        if own_home:
            stack.down(own_home, print)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hotswap.json").write_text(json.dumps(result, indent=2))
    plot(run, published, flipped, args.out / "hotswap.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
