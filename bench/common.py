"""Shared by the benchmarks: percentiles, machine facts, plots."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmesh.loadgen import LoadRun

PROMPT = "Return the number of items in the list"


def summary(latencies_ms: Sequence[float], seconds: float | None = None) -> dict[str, float]:
    """p50/p95/p99/mean of `latencies_ms`, and throughput when the run lasted `seconds`."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"n": 0}

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)

    out = {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "mean_ms": round(statistics.fmean(ordered), 2),
    }
    if seconds:
        out["per_s"] = round(len(ordered) / seconds, 2)
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), "")
    mem_kb = next((int(line.split()[1]) for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def plot_failed(ax: Any, run: LoadRun, t0: float) -> None:
    """Mark the failed requests of `run` on a latency-over-time plot (red crosses)."""
    if run.errors:
        xs, ys = [s.started - t0 for s in run.errors], [s.latency_ms for s in run.errors]
        ax.scatter(xs, ys, s=20, marker="x", color="red", label="failed")


def save(fig: Any, path: Path, dpi: int) -> None:
    """Write a finished plot and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
