"""The embedded stack's layout gives the gateway an HTTP port (its OpenAI-compatible API), and a
layout saved before that port existed still loads, with one that stays the same from then on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmesh.stack import stack
from llmesh.stack.layout import DEFAULT_PORTS, StackLayout


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMESH_RELEASE_HMAC_KEY", "r" * 64)
    monkeypatch.setenv("LLMESH_MESH_HMAC_KEY", "m" * 64)


def test_the_gateway_has_an_http_port_by_default_and_with_free_ports(tmp_path: Path) -> None:
    assert DEFAULT_PORTS["gateway_http"] == 8080
    layout = StackLayout.create(tmp_path / "default", models_dir=tmp_path / "models")
    assert layout.http_url() == "http://127.0.0.1:8080/v1"
    free = StackLayout.create(tmp_path / "free", free_ports=True, models_dir=tmp_path / "models")
    assert free.ports["gateway_http"] != 8080
    assert len(set(free.ports.values())) == len(DEFAULT_PORTS), "each port its own"
    assert free.http_url() == f"http://127.0.0.1:{free.ports['gateway_http']}/v1"


def test_only_the_gateway_gets_the_http_port(tmp_path: Path) -> None:
    layout = StackLayout.create(tmp_path, free_ports=True, models_dir=tmp_path / "models")
    env = {name: stack.service_env(layout, name) for name in ("gateway", "tokenize", "infer", "eval")}
    assert env["gateway"]["LLMESH_HTTP_PORT"] == str(layout.ports["gateway_http"])
    assert env["gateway"]["LLMESH_GRPC_PORT"] == str(layout.ports["gateway"])
    assert all("LLMESH_HTTP_PORT" not in env[name] for name in ("tokenize", "infer", "eval"))


def _saved_without_http(layout: StackLayout) -> None:
    document = json.loads(layout.model_dump_json())
    del document["ports"]["gateway_http"]
    layout.home.mkdir(parents=True, exist_ok=True)
    (layout.home / "stack.json").write_text(json.dumps(document))


def test_a_layout_saved_without_the_http_port_loads_with_one_that_stays(tmp_path: Path) -> None:
    old = StackLayout.create(tmp_path, free_ports=True, models_dir=tmp_path / "models")
    _saved_without_http(old)
    loaded = StackLayout.load(tmp_path)
    assert loaded is not None
    port = loaded.ports["gateway_http"]
    assert port not in {p for name, p in old.ports.items() if name != "gateway_http"}, "a free port, not a taken one"
    assert {name: p for name, p in loaded.ports.items() if name != "gateway_http"} == {
        name: p for name, p in old.ports.items() if name != "gateway_http"
    }
    again = StackLayout.load(tmp_path)
    assert again is not None and again.ports["gateway_http"] == port, "saved: the CLI and the supervisor agree"
    assert stack.service_env(again, "gateway")["LLMESH_HTTP_PORT"] == str(port)


def test_a_default_ports_layout_saved_without_the_http_port_gets_the_default(tmp_path: Path) -> None:
    _saved_without_http(StackLayout.create(tmp_path, models_dir=tmp_path / "models"))
    loaded = StackLayout.load(tmp_path)
    assert loaded is not None and loaded.ports == DEFAULT_PORTS


def test_no_saved_layout_loads_as_none(tmp_path: Path) -> None:
    assert StackLayout.load(tmp_path) is None
