from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmesh.stack import stack

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Demo models are built once and shared by the demo command and every test run."""
    models = Path(os.environ.get("LLMESH_MODELS_DIR", REPO / ".llmesh" / "models")).resolve()
    stack.ensure_demo_models(models, print)
    return models
