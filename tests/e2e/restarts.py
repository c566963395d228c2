"""Restarting one service of the test stack: the stack's supervisor starts a process that died again."""

from __future__ import annotations

import json
import os
import signal
import time

from llmesh import client
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout

RESTART_S = 300  # an infer replica loads every version the desired state needs first: many, late in a session


def wait_until_serving(mesh: StackLayout, name: str, timeout: float = RESTART_S) -> None:
    deadline = time.monotonic() + timeout
    while client.health_status(mesh.address(name)) != "SERVING":
        assert time.monotonic() < deadline, f"{name} did not come back within {timeout:.0f}s"
        time.sleep(0.1)


def wait_restarted(mesh: StackLayout, name: str, old_pid: int, timeout: float = RESTART_S) -> int:
    """Wait until the supervisor has started `name` again (a new pid) and it is SERVING; its pid."""
    deadline = time.monotonic() + timeout
    while (pid := processes.pid_of(mesh, name)) in (None, old_pid):
        assert time.monotonic() < deadline, f"the supervisor did not start {name} again within {timeout:.0f}s"
        time.sleep(0.05)
    assert pid is not None
    wait_until_serving(mesh, name, max(1.0, deadline - time.monotonic()))
    return pid


def kill_and_restart(mesh: StackLayout, name: str) -> None:
    """kill -9 service `name` and wait until the supervisor has it SERVING again (an infer replica
    first loads every version the desired state needs)."""
    pid = processes.pid_of(mesh, name)
    assert pid is not None, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    wait_restarted(mesh, name, pid)


def stopped_cleanly(mesh: StackLayout, name: str, pid: int, since: float, timeout: float = 60) -> bool:
    """Wait until `pid` exits; True if its log says it stopped (it logs "stopped" last, after its
    drain, and exits 0). Whoever started it (this test process or the supervisor) reaps it."""
    deadline = time.monotonic() + timeout
    while processes.alive(pid):
        assert time.monotonic() < deadline, f"{name} did not exit within {timeout:.0f}s"
        time.sleep(0.05)
    for line in (mesh.logs / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and (entry := json.loads(line)).get("msg") == "stopped" and entry["ts"] >= since:
            return True
    return False
