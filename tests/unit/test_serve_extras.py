"""`llmesh serve` on a core-only install (the gateway and tokenize images): infer and eval name what
they lack instead of failing on an import later."""

from __future__ import annotations

from importlib import metadata

import pytest
from typer.testing import CliRunner

from llmesh.cli import main
from llmesh.stack.layout import SERVICES


def test_this_install_runs_every_service() -> None:
    assert [main._missing_requirements(service) for service in SERVICES] == [[]] * len(SERVICES)


def test_serve_refuses_a_service_whose_extra_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    requires = ['torch==2.13.0; extra == "infer"', 'no-such-package[grpc]>=1; extra == "infer"', "redis>=8.1,<9"]
    monkeypatch.setattr(metadata, "requires", lambda _: requires)
    assert main._missing_requirements("gateway") == []
    result = CliRunner().invoke(main.app, ["serve", "infer"])
    assert result.exit_code == 2
    assert "infer needs no-such-package: pip install 'llmesh[infer]'" in result.output
