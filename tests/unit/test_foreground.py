"""The Triton model's Foreground: a candidate's stub sees the primary stubs' running requests."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

MODEL_PY = Path(__file__).parents[2] / "services" / "infer" / "triton_model" / "model.py"


@pytest.fixture(scope="module")
def model_module() -> types.ModuleType:
    # model.py runs inside Triton's stub, which provides this module; nothing of it is used here.
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("triton_model_under_test", MODEL_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, count: int) -> None:
    path.write_bytes(struct.pack("q", count))


def test_busy_while_another_live_stub_runs_foreground_requests(model_module, tmp_path):
    other = subprocess.Popen(["sleep", "30"])
    try:
        _write(tmp_path / str(other.pid), 1)
        candidate = model_module.Foreground(str(tmp_path))
        assert candidate.busy()
        _write(tmp_path / str(other.pid), 0)
        assert not candidate.busy()
    finally:
        other.kill()
        other.wait()


def test_own_requests_and_dead_stubs_do_not_count(model_module, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write(tmp_path / str(dead.pid), 3)
    stub = model_module.Foreground(str(tmp_path))
    stub.enter(1)
    assert not stub.busy()
    assert not (tmp_path / str(dead.pid)).exists()  # the stale file is cleaned up
    assert struct.unpack("q", (tmp_path / str(os.getpid())).read_bytes())[0] == 1
