"""Runs the benchmarks (on a stack of their own, or offline in this process) and writes JSON, plots and a summary."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import batching, engines, hotswap, overhead, resources, scale, scenario, shadow_cost, soak, stream
from bench.common import machine
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout

BENCHMARKS: dict[str, Callable[[StackLayout, Path, bool], dict[str, Any]]] = {
    "stream": stream.run,  # first: time to first token on a broker that no load has filled yet
    "resources": resources.run,
    "overhead": overhead.run,
    "swap": hotswap.run,
    "shadow": shadow_cost.run,
    "scenario": scenario.run,
    "scale": scale.run,
    "batching": batching.run,
    "soak": soak.run,  # minutes long: by name only, not in `all`
}
# These need no stack: they load the demo model in this process (by name only, not in `all`).
OFFLINE: dict[str, Callable[[Path, bool, Path, Callable[[str], None]], dict[str, Any]]] = {
    "engines": engines.run,
}
# These start on a fresh stack: the embedded broker keeps every message in memory and slows as it
# accumulates them, which would charge them for the load of the benchmarks before.
FRESH = {"overhead", "shadow", "scale", "soak", "batching"}
POLICY = shadow_cost.HOLD_POLICY + f"  {soak.MODEL}: {{on_pass: hold, on_fail: hold}}\n"


def run(names: list[str], out: Path, quick: bool, models_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Run `names` (OFFLINE ones first, in this process; then in BENCHMARKS order on stacks of their own:
    free ports, a promotion policy that holds the benchmarks' shadow models); write `<out>/<name>.json`
    and `<out>/summary.json`."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"machine": machine(), "quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name in [name for name in OFFLINE if name in names]:
        stack.ensure_demo_models(models_dir, say)
        say(f"benchmark {name} (offline) ...")
        started = time.perf_counter()
        result = OFFLINE[name](out, quick, models_dir, say)
        result["seconds"] = round(time.perf_counter() - started, 1)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        summary[name] = result
    names = [name for name in names if name not in OFFLINE]
    if not names:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    home = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    (home / "policy.yaml").write_text(POLICY)
    os.environ["LLMESH_POLICY_FILE"] = str(home / "policy.yaml")
    layout: StackLayout | None = None
    try:
        for name in sorted(names, key=list(BENCHMARKS).index):
            if layout is not None and name in FRESH:
                stack.down(home, say)
                layout = None
            if layout is None:
                # the soak measures memory growth: eval's embedding model is loaded before, not during it
                os.environ["LLMESH_PRELOAD_EMBEDDER"] = "true" if name == "soak" else "false"
                layout = stack.up(home, say, free_ports=True, models_dir=models_dir)
            say(f"benchmark {name} ...")
            started = time.perf_counter()
            result = BENCHMARKS[name](layout, out, quick)
            result["seconds"] = round(time.perf_counter() - started, 1)
            (out / f"{name}.json").write_text(json.dumps(result, indent=2))
            summary[name] = result
    finally:
        if layout is not None:
            stack.down(home, say)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
