"""Runs the benchmarks on a stack of their own and writes JSON, plots and a summary."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import hotswap, overhead, resources, shadow_cost, stream
from bench.common import machine
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout

BENCHMARKS: dict[str, Callable[[StackLayout, Path, bool], dict[str, Any]]] = {
    "overhead": overhead.run,
    "stream": stream.run,
    "resources": resources.run,
    "swap": hotswap.run,
    "shadow": shadow_cost.run,
}


def run(names: list[str], out: Path, quick: bool, models_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Start a stack (free ports, a promotion policy that holds the benchmarks' shadow models), run
    `names` in order, write `<out>/<name>.json` and `<out>/summary.json`; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    (home / "policy.yaml").write_text(shadow_cost.HOLD_POLICY)
    os.environ["LLMESH_POLICY_FILE"] = str(home / "policy.yaml")
    summary: dict[str, Any] = {"machine": machine(), "quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    layout = stack.up(home, say, free_ports=True, models_dir=models_dir)
    try:
        for name in names:
            say(f"benchmark {name} ...")
            started = time.perf_counter()
            result = BENCHMARKS[name](layout, out, quick)
            result["seconds"] = round(time.perf_counter() - started, 1)
            (out / f"{name}.json").write_text(json.dumps(result, indent=2))
            summary[name] = result
    finally:
        stack.down(home, say)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
