"""`llmesh up` then `llmesh down` (the real commands) leave no process of the stack behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from llmesh.stack import processes
from llmesh.stack.layout import StackLayout

pytestmark = pytest.mark.slow


def _stack_processes(home: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            text = (
                " ".join(proc.info["cmdline"] or []) + " " + " ".join(f"{k}={v}" for k, v in (proc.info["environ"] or {}).items())
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(home) in text and proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
    return found


def test_up_then_down_leaves_nothing(tmp_path: Path, models_dir: Path):
    home = tmp_path / "stack"
    env = {**os.environ, "LLMESH_MODELS_DIR": str(models_dir)}
    cli = [sys.executable, "-m", "llmesh.cli"]
    up = subprocess.run([*cli, "up", "--home", str(home), "--free-ports"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        layout = StackLayout.load(home)
        assert layout is not None
        pids = [int(p.read_text()) for p in layout.pids.glob("*.pid")]
        assert len(pids) == 7, "broker, redis, the four services and the supervisor"
        infer = processes.pid_of(layout, "infer")
        assert infer is not None and processes.child_named(infer, "tritonserver"), "infer runs tritonserver"
        triton_stubs = [p for p in _stack_processes(home) if "triton_python_backend_stub" in p]
        assert triton_stubs, "the model should run in a Triton python stub process"
    finally:  # a failed check must not leave a stack running for the rest of the session
        down = subprocess.run([*cli, "down", "--home", str(home)], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert _stack_processes(home) == []
