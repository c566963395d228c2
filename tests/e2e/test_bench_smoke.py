"""A short run of the hot-swap benchmark (the full one: python bench/hotswap.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_hotswap_benchmark_smoke(mesh, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("hotswap", REPO / "bench" / "hotswap.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result, run, published, flipped = bench.run_benchmark(mesh, mesh.models_dir, clients=2, steady_s=1.0, after_s=1.0)
    bench.plot(run, published, flipped, tmp_path / "hotswap.png")
    assert result["failed_requests"] == 0
    assert result["mixed_version_responses"] == 0
    assert result["after_flip_on_new_version"] is True
    assert (tmp_path / "hotswap.png").stat().st_size > 10_000


def test_shadow_cost_benchmark_smoke(mesh, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("shadow_cost", REPO / "bench" / "shadow_cost.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result, runs = bench.run_benchmark(mesh, clients=2, seconds=1.5)
    bench.plot(runs, tmp_path / "shadow_cost.png")
    assert result["failed_requests"] == 0
    assert all(phase["requests"] > 0 for phase in result["phases"].values())
    assert result["p99_ratio_100_vs_0"] > 0
    assert (tmp_path / "shadow_cost.png").stat().st_size > 5_000
