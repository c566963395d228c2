"""CPU and memory of every process of the stack: idle, and under a short closed-loop load."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import pyplot, save
from bench.process_stats import cpu_percent, rss_mb
from llmesh.loadgen import GatewayLoad
from llmesh.stack.layout import StackLayout


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    seconds = 4.0 if quick else 15.0
    time.sleep(3)  # consumers fall back to idle polling after 2 s without requests
    idle_cpu = cpu_percent(layout, seconds)
    idle_rss = rss_mb(layout)
    with GatewayLoad(layout.address("gateway"), "chat", clients=4, max_tokens=16):
        time.sleep(1)
        load_cpu = cpu_percent(layout, seconds)
        load_rss = rss_mb(layout)
    result = {
        "idle_cpu_percent_of_one_core": idle_cpu,
        "load_cpu_percent_of_one_core": load_cpu,
        "idle_rss_mb": idle_rss,
        "load_rss_mb": load_rss,
        "load": "4 closed-loop gateway clients, 16 new tokens",
    }
    plot(idle_rss, load_rss, out / "resources.png")
    return result


def plot(idle: dict[str, float], load: dict[str, float], path: Path) -> None:
    plt = pyplot()
    names = sorted(set(idle) | set(load))
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([x - 0.2 for x in xs], [idle.get(n, 0) for n in names], width=0.4, label="idle")
    ax.bar([x + 0.2 for x in xs], [load.get(n, 0) for n in names], width=0.4, label="under load")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Resident memory per process")
    ax.legend()
    save(fig, path, dpi=110)
