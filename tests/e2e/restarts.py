"""Restarting one service of the test stack."""

from __future__ import annotations

import time

from llmesh import client
from llmesh.stack import stack
from llmesh.stack.layout import StackLayout


def restart(mesh: StackLayout, name: str, timeout: float = 60) -> None:
    """Start service `name` again and wait until it is SERVING."""
    stack.start_service(mesh, name)
    wait_until_serving(mesh, name, timeout)


def wait_until_serving(mesh: StackLayout, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.health_status(mesh.address(name)) != "SERVING":
        assert time.monotonic() < deadline, f"{name} did not come back within {timeout:.0f}s"
        time.sleep(0.1)
