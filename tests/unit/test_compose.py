"""deploy/docker/compose.yaml (and its GPU override) passes the Compose specification strictly, and
agrees with the code: the images build-images.sh makes, the ports they serve, the settings they read."""

from __future__ import annotations

import importlib
import json
import re
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from llmesh.common.settings import ServiceSettings

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"
SERVICES = ("gateway", "tokenize", "infer", "eval")


@cache
def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())  # resolves the `<<:` merge keys as compose does


def validate(document: dict[str, Any]) -> PyCompose:
    return PyCompose.from_json(json.dumps(document))


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_passes_the_compose_specification(name: str) -> None:
    assert validate(compose(name)).service_names()


def test_a_misspelled_field_fails() -> None:
    infer = compose("compose.yaml")["services"]["infer"]
    broken = compose("compose.yaml") | {"services": {"infer": {**infer, "shm_sise": "1gb"}}}
    with pytest.raises(ValueError, match="shm_sise"):
        validate(broken)


def test_runs_the_images_build_images_makes() -> None:
    version = metadata.version("llmesh")
    services = compose("compose.yaml")["services"]
    for service in SERVICES:
        assert services[service]["image"] == f"llmesh/{service}:{version}"
        assert (DOCKER / f"{service}.Dockerfile").exists()
    published = services["gateway"]["ports"][0].split(":")[1]
    assert f"LLMESH_GRPC_PORT={published} " in (DOCKER / "gateway.Dockerfile").read_text()


def test_the_gateway_publishes_its_http_api() -> None:
    """The OpenAI-compatible HTTP API: the image exposes 8080 and listens there on all interfaces (as
    LLMESH_GRPC_HOST=0.0.0.0 in the runtime image), and compose publishes it."""
    dockerfile = (DOCKER / "gateway.Dockerfile").read_text()
    (expose,) = (line.split()[1:] for line in dockerfile.splitlines() if line.startswith("EXPOSE "))
    assert "8080" in expose
    assert "LLMESH_HTTP_PORT=8080 " in dockerfile and "LLMESH_HTTP_HOST=0.0.0.0" in dockerfile
    assert "8080:8080" in compose("compose.yaml")["services"]["gateway"]["ports"]
    for service in set(SERVICES) - {"gateway"}:
        assert "8080" not in (DOCKER / f"{service}.Dockerfile").read_text()


def settings_class(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    (cls,) = (c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__)
    return cls


def read(settings: ServiceSettings, variable: str) -> object:
    value: object = settings
    for part in variable.removeprefix("LLMESH_").lower().split("__"):
        value = getattr(value, part)  # AttributeError: a variable no setting reads
    return value


@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_it_sets_changes_a_setting(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    environment = dict(compose("compose.yaml")["services"][service]["environment"])
    if service == "infer":
        environment |= compose("compose.gpu.yaml")["services"]["infer"]["environment"]
    cls = settings_class(service)
    defaults = cls()
    for variable, value in environment.items():
        monkeypatch.setenv(variable, str(value))
    configured = cls()
    for variable in environment:
        assert re.fullmatch(r"LLMESH_[A-Z_]+", variable)
        assert read(configured, variable) != read(defaults, variable), f"{service} ignores {variable}"
