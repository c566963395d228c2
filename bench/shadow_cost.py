"""Shadow-cost benchmark: the primary's latency with 0% and with 100% of requests mirrored to a
shadow candidate, in one run (0% before and after, 100% in between).

    python bench/shadow_cost.py [--clients 4] [--seconds 15] [--out bench/results]

Starts its own stack (free ports) whose promotion policy holds the bench model (so the candidate
stays a shadow for the whole run), and writes shadow_cost.json and shadow_cost.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from llmesh import client
from llmesh.common.events import ReleaseMode
from llmesh.loadgen import GatewayLoad, LoadRun, wait_for_primary
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout
from llmesh.v1 import eval_pb2, eval_pb2_grpc, gateway_pb2, gateway_pb2_grpc

MODEL = "shadowcost"
HOLD_POLICY = f"models:\n  {MODEL}: {{on_pass: hold, on_fail: hold}}\n"


def _percentiles(run: LoadRun) -> dict[str, float]:
    ordered = sorted(s.latency_ms for s in run.samples)
    return {
        "requests": len(ordered),
        "failed": len(run.errors),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


def _phase(address: str, clients: int, seconds: float) -> LoadRun:
    with GatewayLoad(address, MODEL, clients=clients, max_tokens=16) as load:
        time.sleep(seconds)
    return load.run


def _wait_for_state(stub: gateway_pb2_grpc.GatewayStub, version: int, done: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = stub.GetModel(gateway_pb2.GetModelRequest(name=MODEL), timeout=5)
        if done in {v.version: v.reason for v in info.versions}.get(version, ""):
            return
        time.sleep(0.05)
    raise TimeoutError(f"v{version} never reached {done!r}")


def _mirror_counts(address: str, mirrored: int) -> dict[str, int]:
    """How many mirrored requests eval scored; the rest were dropped by infer's shadow backlog."""
    time.sleep(2)  # the last mirrors finish
    with grpc.insecure_channel(address) as channel:
        report = eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(model=MODEL), timeout=10)
    scored = report.candidates[0].pairs if report.candidates else 0
    return {"mirrored": mirrored, "scored": scored, "not_scored": mirrored - scored}


def run_benchmark(layout: StackLayout, clients: int, seconds: float) -> tuple[dict[str, object], dict[str, LoadRun]]:
    bootstrap, address = layout.address("broker"), layout.address("gateway")
    v1 = layout.models_dir / "chat-v1"
    runs: dict[str, LoadRun] = {}
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        asyncio.run(client.publish_release(bootstrap, client.release_for(MODEL, 1, v1)))
        wait_for_primary(stub, MODEL, 1, timeout=120)
        runs["0% before"] = _phase(address, clients, seconds)
        asyncio.run(
            client.publish_release(bootstrap, client.release_for(MODEL, 2, v1, mode=ReleaseMode.SHADOW, share_percent=100))
        )
        _wait_for_state(stub, 2, "shadow candidate")
        runs["100% mirrored"] = _phase(address, clients, seconds)
        mirrors = _mirror_counts(layout.address("eval"), len(runs["100% mirrored"].samples))
        asyncio.run(
            client.publish_release(bootstrap, client.release_for(MODEL, 2, v1, mode=ReleaseMode.RETIRE, reason="bench done"))
        )
        _wait_for_state(stub, 2, "bench done")
        runs["0% after"] = _phase(address, clients, seconds)
    phases = {name: _percentiles(run) for name, run in runs.items()}
    baseline_p99 = (phases["0% before"]["p99_ms"] + phases["0% after"]["p99_ms"]) / 2
    baseline_p50 = (phases["0% before"]["p50_ms"] + phases["0% after"]["p50_ms"]) / 2
    result: dict[str, object] = {
        "clients": clients,
        "seconds_per_phase": seconds,
        "phases": phases,
        "p99_ratio_100_vs_0": round(phases["100% mirrored"]["p99_ms"] / baseline_p99, 3),
        "p50_ratio_100_vs_0": round(phases["100% mirrored"]["p50_ms"] / baseline_p50, 3),
        "failed_requests": sum(p["failed"] for p in phases.values()),
        "mirrors": mirrors,
    }
    return result, runs


def plot(runs: dict[str, LoadRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot([[s.latency_ms for s in r.samples] for r in runs.values()], showfliers=False)
    ax.set_xticks(range(1, len(runs) + 1), list(runs))
    ax.set_ylabel("primary latency (ms)")
    ax.set_title("Shadow cost: the client's latency with 0% and 100% mirroring")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path, default=Path(".llmesh/models"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    (home / "policy.yaml").write_text(HOLD_POLICY)
    os.environ["LLMESH_POLICY_FILE"] = str(home / "policy.yaml")
    layout = stack.up(home, print, free_ports=True, models_dir=args.models_dir.resolve())
    try:
        result, runs = run_benchmark(layout, args.clients, args.seconds)
    finally:
        stack.down(home, print)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow_cost.json").write_text(json.dumps(result, indent=2))
    plot(runs, args.out / "shadow_cost.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
