"""The embedded stack is secure by default: a release key made once, private, given to every service;
infer may read only the folders the operator allows."""

from __future__ import annotations

import json
from pathlib import Path

from llmesh.stack import stack
from llmesh.stack.layout import StackLayout


def test_the_embedded_stack_makes_its_release_key_once_and_keeps_it_private(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("LLMESH_RELEASE_HMAC_KEY", raising=False)
    layout = StackLayout.create(
        tmp_path / "home", free_ports=True, models_dir=tmp_path / "models", artifact_roots=[tmp_path / "ops"]
    )
    key = layout.release_key()
    assert len(key) == 64 and layout.release_key() == key
    assert (layout.home / "release.key").stat().st_mode & 0o777 == 0o600
    env = {name: stack.service_env(layout, name) for name in ("gateway", "tokenize", "infer", "eval")}
    assert {e["LLMESH_RELEASE_HMAC_KEY"] for e in env.values()} == {key}, "every service checks or signs with it"
    roots = json.loads(env["infer"]["LLMESH_ARTIFACT_ROOTS"])
    assert roots == [str(tmp_path / "models"), str((tmp_path / "ops").resolve())]
