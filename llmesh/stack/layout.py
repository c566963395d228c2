"""Where the embedded stack lives: its home folder, ports, and the files it writes."""

from __future__ import annotations

import os
import random
import secrets
import socket
from pathlib import Path

from pydantic import BaseModel

DEFAULT_PORTS = {
    "broker": 19092,
    "redis": 16379,
    "triton_http": 18000,
    "triton_grpc": 18001,
    "triton_metrics": 18002,
    "gateway": 50051,
    "gateway_http": 8080,  # the gateway's OpenAI-compatible HTTP API
    "tokenize": 50052,
    "infer": 50053,
    "eval": 50054,
    "gateway_metrics": 9101,
    "tokenize_metrics": 9102,
    "infer_metrics": 9103,
    "eval_metrics": 9104,
}
SERVICES = ("infer", "tokenize", "eval", "gateway")


def default_home() -> Path:
    return Path(os.environ.get("LLMESH_HOME", ".llmesh")).resolve()


# Below the kernel's ephemeral range (32768+), so that an outgoing connection made between picking a
# port and binding it cannot take it.
PORT_RANGE = (20000, 32000)


def free_port(taken: set[int] | None = None) -> int:
    taken = taken if taken is not None else set()
    for _ in range(1000):
        port = random.randrange(*PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


class StackLayout(BaseModel):
    home: Path
    ports: dict[str, int]
    models_dir: Path
    artifact_roots: list[Path] = []  # folders the operator releases from, besides models_dir

    @classmethod
    def create(
        cls, home: Path, *, free_ports: bool = False, models_dir: Path | None = None, artifact_roots: list[Path] | None = None
    ) -> StackLayout:
        taken: set[int] = set()
        ports = {name: free_port(taken) for name in DEFAULT_PORTS} if free_ports else dict(DEFAULT_PORTS)
        env_models = os.environ.get("LLMESH_MODELS_DIR")
        models = models_dir or (Path(env_models).resolve() if env_models else home / "models")
        roots = [root.resolve() for root in artifact_roots or []]
        return cls(home=home, ports=ports, models_dir=models, artifact_roots=roots)

    def release_key(self) -> str:
        """The stack's release signing key: from LLMESH_RELEASE_HMAC_KEY, else made once and kept in
        `<home>/release.key` (mode 0600), so every event on the embedded broker is signed."""
        return self._secret("LLMESH_RELEASE_HMAC_KEY", "release.key")

    def mesh_key(self) -> str:
        """The key that seals the services' own messages (llmesh/common/seal.py): from
        LLMESH_MESH_HMAC_KEY, else made once in `<home>/mesh.key` (0600). Only the services get it."""
        return self._secret("LLMESH_MESH_HMAC_KEY", "mesh.key")

    def _secret(self, variable: str, filename: str) -> str:
        if key := os.environ.get(variable):
            return key
        path = self.home / filename
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()

    @property
    def model_store(self) -> Path:
        return self.home / "model-store"

    @classmethod
    def load(cls, home: Path) -> StackLayout | None:
        """The saved layout, or None. A port added since it was saved (`gateway_http`) is filled in
        once and saved: its default when the stack runs on the default ports, else a free port."""
        path = home / "stack.json"
        if not path.exists():
            return None
        layout = cls.model_validate_json(path.read_text())
        if missing := [name for name in DEFAULT_PORTS if name not in layout.ports]:
            defaults = all(DEFAULT_PORTS.get(name) == port for name, port in layout.ports.items())
            taken = set(layout.ports.values())
            for name in missing:
                layout.ports[name] = DEFAULT_PORTS[name] if defaults else free_port(taken)
            layout.save()
        return layout

    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "stack.json").write_text(self.model_dump_json(indent=2))

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def http_url(self, name: str = "gateway_http") -> str:
        """The base URL of the gateway's OpenAI-compatible HTTP API (`.../v1/chat/completions`)."""
        return f"http://127.0.0.1:{self.ports[name]}/v1"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def pids(self) -> Path:
        return self.home / "pids"

    @property
    def triton_repository(self) -> Path:
        return self.home / "triton" / "models"

    @property
    def triton_backends(self) -> Path:
        return self.home / "triton" / "backends"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"
