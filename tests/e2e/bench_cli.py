"""Running `llmesh bench` from the tests, on a stack of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_bench(models_dir: Path, out: Path, *names: str) -> subprocess.CompletedProcess[str]:
    """`llmesh bench NAMES --quick --out OUT`; its stack runs unsigned, like `llmesh up`."""
    env = {**os.environ, "LLMESH_MODELS_DIR": str(models_dir)}
    env.pop("LLMESH_RELEASE_HMAC_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "llmesh.cli.main", "bench", *names, "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
