"""Soak: sustained load at a fixed rate for minutes while releases keep coming (a shadow candidate,
then its promotion by a swap, again and again): every error is counted, and the memory of each
process is compared between the start and the end."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from bench.common import plot_failed, pyplot, save, summary
from bench.process_stats import rss_mb, stack_processes
from llmesh import client
from llmesh.common.events import ReleaseMode
from llmesh.loadgen import GatewayLoad, LoadRun, wait_for_primary
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODEL = "soak"  # held by the bench's promotion policy: the soak itself promotes its candidates
LIVE = (common_pb2.VERSION_STATE_READY, common_pb2.VERSION_STATE_SERVING)
CLIENTS, INTERVAL_S = 4, 0.5  # at most 8 requests a second, half of them streamed


def _publish(layout: StackLayout, version: int, mode: ReleaseMode) -> None:
    artifacts = layout.models_dir / ("chat-v1" if version % 2 else "chat-v2")
    event = client.release_for(MODEL, version, artifacts, mode=mode, share_percent=50)
    asyncio.run(client.publish_release(layout.address("broker"), event))


def _wait_for_candidate(stub: gateway_pb2_grpc.GatewayStub, version: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = stub.GetModel(gateway_pb2.GetModelRequest(name=MODEL), timeout=5)
        if any(v.version == version and v.state in LIVE for v in info.versions):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{MODEL} v{version} did not become a candidate within {timeout:.0f}s")


def _cycle(layout: StackLayout, stub: gateway_pb2_grpc.GatewayStub, version: int, period_s: float) -> list[dict[str, Any]]:
    """Shadow `version` for half a period, then swap to it; returns what happened when."""
    events = []
    started = time.monotonic()
    _publish(layout, version, ReleaseMode.SHADOW)
    _wait_for_candidate(stub, version)
    events.append({"at": started, "release": f"shadow v{version}"})
    time.sleep(max(0.0, started + period_s / 2 - time.monotonic()))
    events.append({"at": time.monotonic(), "release": f"swap v{version}"})
    _publish(layout, version, ReleaseMode.SWAP)
    wait_for_primary(stub, MODEL, version, timeout=120)
    time.sleep(max(0.0, started + period_s - time.monotonic()))
    return events


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    seconds, period = (45.0, 15.0) if quick else (300.0, 60.0)  # after the warm-up cycle
    address = layout.address("gateway")
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        _publish(layout, 1, ReleaseMode.SWAP)
        wait_for_primary(stub, MODEL, 1, timeout=120)
        with GatewayLoad(address, MODEL, clients=CLIENTS, max_tokens=16, interval_s=INTERVAL_S) as load:
            version = 2
            events = _cycle(layout, stub, version, period)  # warm-up: first release cycle under load
            _wait_for_embedder(layout)  # the bench's stack preloads it: not charged to the measured window
            rss_start, stubs_start, started = rss_mb(layout), _stubs(layout), time.monotonic()
            while time.monotonic() - started < seconds - period / 2:
                version += 1
                events += _cycle(layout, stub, version, period)
            rss_end, stubs_end = rss_mb(layout), _stubs(layout)
    result = summarize(load.run, rss_start, rss_end) | {
        "releases": len(events),
        "seconds_under_load": round(time.monotonic() - started + period, 1),
        "memory_measured_over_s": round(time.monotonic() - started, 1),
        "triton_stubs_start_end": [stubs_start, stubs_end],  # one per loaded model instance
    }
    plot(load.run, events, out / "soak.png")
    return result


def _wait_for_embedder(layout: StackLayout, timeout: float = 180) -> None:
    url = f"http://127.0.0.1:{layout.ports['eval_metrics']}/metrics"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as response:
            if "llmesh_eval_embedder_loaded 1.0" in response.read().decode():
                return
        time.sleep(0.5)
    raise TimeoutError(f"eval did not load its embedding model within {timeout:.0f}s")


def _stubs(layout: StackLayout) -> list[int]:
    """RSS in MB of each Triton stub process (one per loaded model instance)."""
    return [round(p.memory_info().rss / 2**20) for p in stack_processes(layout).get("triton-stubs", [])]


def summarize(run: LoadRun, rss_start: dict[str, float], rss_end: dict[str, float]) -> dict[str, Any]:
    """Every request counts; memory is compared from after the first release cycle to the end."""
    samples = run.samples
    errors: dict[str, int] = {}
    for s in samples:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    services = [name for name in rss_start if name in rss_end]
    return {
        "requests": len(samples),
        "failed_requests": sum(errors.values()),
        "errors": errors,
        "latency": summary([s.latency_ms for s in samples]),
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "rss_growth_mb": {name: round(rss_end[name] - rss_start[name], 1) for name in services},
    }


def plot(run: LoadRun, events: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    t0 = min(s.started for s in run.samples)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ok = [s for s in run.samples if not s.error]
    ax.scatter([s.started - t0 for s in ok], [s.latency_ms for s in ok], s=4, label="answered")
    plot_failed(ax, run, t0)
    for event in events:
        ax.axvline(event["at"] - t0, color="gray" if "shadow" in event["release"] else "black", linewidth=0.8)
    ax.set_xlabel("request start (s); gray: shadow release, black: swap")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Soak: fixed-rate load while candidates are shadowed and promoted")
    ax.legend(loc="upper left")
    save(fig, path, dpi=120)
