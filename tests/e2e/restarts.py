"""Restarting one service of the test stack."""

from __future__ import annotations

import os
import signal
import time

from llmesh import client
from llmesh.stack import processes, stack
from llmesh.stack.layout import StackLayout


def restart(mesh: StackLayout, name: str, timeout: float = 120) -> None:
    """Start service `name` again and wait until it is SERVING."""
    stack.start_service(mesh, name)
    wait_until_serving(mesh, name, timeout)


def wait_until_serving(mesh: StackLayout, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.health_status(mesh.address(name)) != "SERVING":
        assert time.monotonic() < deadline, f"{name} did not come back within {timeout:.0f}s"
        time.sleep(0.1)


def kill_and_restart(mesh: StackLayout, name: str) -> None:
    """kill -9 service `name`, start it again and wait until it is SERVING (an infer replica first
    loads every version the desired state needs)."""
    pid = processes.pid_of(mesh, name)
    assert pid is not None, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    while processes.alive(pid):
        time.sleep(0.05)
    restart(mesh, name)
