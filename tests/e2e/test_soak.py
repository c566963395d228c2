"""`llmesh bench soak --quick`: fixed-rate load for 45 s while a candidate is shadowed and promoted
every 15 s: no request fails, the services' memory stays flat, and retired versions leave no Triton
stub behind (the full soak: 5 minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.bench_cli import run_bench

pytestmark = pytest.mark.slow
SERVICES = ("gateway", "tokenize", "infer", "eval")


def test_soak_quick(models_dir: Path, tmp_path: Path):
    out = tmp_path / "results"
    run_bench(models_dir, out, "soak")
    soak = json.loads((out / "soak.json").read_text())
    assert soak["requests"] > 100 and soak["releases"] >= 4
    assert soak["failed_requests"] == 0, soak["errors"]
    for name in SERVICES:
        assert soak["rss_growth_mb"][name] < 40, f"{name} grew {soak['rss_growth_mb'][name]} MB in 45 s"
    start, end = soak["triton_stubs_start_end"]
    assert len(end) <= len(start) + 1, "unloaded versions left their Triton stubs running"
    assert (out / "soak.png").stat().st_size > 5_000
