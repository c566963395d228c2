"""`llmesh bench all --quick`: every benchmark runs end to end on a stack of its own and writes its
JSON and plots (the full run: `llmesh bench all`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.bench_cli import run_bench

pytestmark = pytest.mark.slow


def test_llmesh_bench_all_quick(models_dir: Path, tmp_path: Path):
    out = tmp_path / "results"
    done = run_bench(models_dir, out, "all")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["cpus"] >= 1
    cell = summary["overhead"]["cells"][0]
    assert cell["direct"]["n"] > 0 and cell["gateway"]["n"] > 0 and cell["throughput_ratio"] > 0
    assert cell["http"]["n"] > 0 and cell["http_throughput_ratio"] > 0
    assert summary["overhead"]["broker_round_trip"]["n"] == 50
    assert summary["stream"]["gateway"]["ttft"]["n"] == 5
    assert summary["resources"]["idle_rss_mb"]["gateway"] > 0
    for swap in (summary["swap"], summary["swap"]["two_replicas"]):  # one infer replica, then two
        assert swap["failed_requests"] == 0 and swap["mixed_version_responses"] == 0
    assert summary["shadow"]["clients_1"]["failed_requests"] == 0
    assert summary["scenario"]["answers_equal"] and summary["scenario"]["scenario"]["n"] == 20
    assert summary["scale"]["one_replica"]["n"] > 0 and summary["scale"]["two_replicas"]["n"] > 0
    batching = summary["batching"]["cells"]
    assert all(c["batching"]["n"] > 0 and c["one_thread"]["n"] > 0 and c["tokens_per_s_ratio"] > 0 for c in batching)
    assert summary["batching"]["device"] and summary["batching"]["ttft_c16"]["batching"]["n"] > 0
    for plot in ("overhead", "stream", "resources", "hotswap", "shadow_cost_1", "scale", "batching"):
        assert (out / f"{plot}.png").stat().st_size > 5_000
    assert "idle CPU, whole stack" in done.stdout
