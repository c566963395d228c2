"""`llmesh bench soak --quick`: fixed-rate load for 45 s while a candidate is shadowed and promoted
every 15 s: no request fails, the services' memory stays flat, and retired versions leave no Triton
stub behind (the full soak: 5 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SERVICES = ("gateway", "tokenize", "infer", "eval")


def test_soak_quick(models_dir: Path, tmp_path: Path):
    out = tmp_path / "results"
    env = {**os.environ, "LLMESH_MODELS_DIR": str(models_dir)}
    env.pop("LLMESH_RELEASE_HMAC_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "llmesh.cli.main", "bench", "soak", "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    soak = json.loads((out / "soak.json").read_text())
    assert soak["requests"] > 100 and soak["releases"] >= 4
    assert soak["failed_requests"] == 0, soak["errors"]
    for name in SERVICES:
        assert soak["rss_growth_mb"][name] < 40, f"{name} grew {soak['rss_growth_mb'][name]} MB in 45 s"
    start, end = soak["triton_stubs_start_end"]
    assert len(end) <= len(start) + 1, "unloaded versions left their Triton stubs running"
    assert (out / "soak.png").stat().st_size > 5_000
