"""Shadow cost: the primary's latency with 0% and with 100% of requests mirrored to a shadow
candidate, in one run (0% before and after, 100% in between), at 1 and 4 clients.

The stack's promotion policy must hold the bench models (HOLD_POLICY), so that the candidate stays a
shadow for the whole run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import pyplot, save, summary
from llmesh import client
from llmesh.common.events import ReleaseMode
from llmesh.loadgen import GatewayLoad, LoadRun, wait_for_primary
from llmesh.stack.layout import StackLayout
from llmesh.v1 import eval_pb2, eval_pb2_grpc, gateway_pb2, gateway_pb2_grpc

MODELS = ("shadowcost", "shadowcost4")
HOLD_POLICY = "models:\n" + "".join(f"  {m}: {{on_pass: hold, on_fail: hold}}\n" for m in MODELS)


def _percentiles(run: LoadRun) -> dict[str, float]:
    figures = summary([s.latency_ms for s in run.samples])
    return {"requests": figures["n"], "failed": len(run.errors), "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"]}


def _phase(address: str, model: str, clients: int, seconds: float) -> LoadRun:
    with GatewayLoad(address, model, clients=clients, max_tokens=16) as load:
        time.sleep(seconds)
    return load.run


def _wait_for_state(stub: gateway_pb2_grpc.GatewayStub, model: str, version: int, done: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = stub.GetModel(gateway_pb2.GetModelRequest(name=model), timeout=5)
        if done in {v.version: v.reason for v in info.versions}.get(version, ""):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{model} v{version} never reached {done!r}")


def _mirror_counts(address: str, model: str, mirrored: int) -> dict[str, int]:
    """How many mirrored requests eval scored; the rest were dropped by infer's shadow backlog."""
    time.sleep(2)  # the last mirrors finish
    with grpc.insecure_channel(address) as channel:
        report = eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(model=model), timeout=10)
    scored = report.candidates[0].pairs if report.candidates else 0
    return {"mirrored": mirrored, "scored": scored, "not_scored": mirrored - scored}


def run_benchmark(
    layout: StackLayout, clients: int, seconds: float, model: str = MODELS[0]
) -> tuple[dict[str, object], dict[str, LoadRun]]:
    bootstrap, address = layout.address("broker"), layout.address("gateway")
    v1 = layout.models_dir / "chat-v1"  # the candidate is the same model: only the cost differs
    runs: dict[str, LoadRun] = {}
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        asyncio.run(client.publish_release(bootstrap, client.release_for(model, 1, v1)))
        wait_for_primary(stub, model, 1, timeout=120)
        runs["0% before"] = _phase(address, model, clients, seconds)
        shadow = client.release_for(model, 2, v1, mode=ReleaseMode.SHADOW, share_percent=100)
        asyncio.run(client.publish_release(bootstrap, shadow))
        _wait_for_state(stub, model, 2, "shadow candidate")
        runs["100% mirrored"] = _phase(address, model, clients, seconds)
        mirrors = _mirror_counts(layout.address("eval"), model, len(runs["100% mirrored"].samples))
        retire = client.release_for(model, 2, v1, mode=ReleaseMode.RETIRE, reason="bench done")
        asyncio.run(client.publish_release(bootstrap, retire))
        _wait_for_state(stub, model, 2, "bench done")
        runs["0% after"] = _phase(address, model, clients, seconds)
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


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for clients, model in zip((1, 4), MODELS, strict=True):
        figures, runs = run_benchmark(layout, clients, 1.5 if quick else 10.0, model)
        plot(runs, out / f"shadow_cost_{clients}.png")
        result[f"clients_{clients}"] = figures
        if quick:
            break
    return result


def plot(runs: dict[str, LoadRun], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot([[s.latency_ms for s in r.samples] for r in runs.values()], showfliers=False)
    ax.set_xticks(range(1, len(runs) + 1), list(runs))
    ax.set_ylabel("primary latency (ms)")
    ax.set_title("Shadow cost: the client's latency with 0% and 100% mirroring")
    save(fig, path, dpi=120)
