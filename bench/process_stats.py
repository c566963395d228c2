"""CPU and memory of the embedded stack's processes (each started in its own process group)."""

from __future__ import annotations

import contextlib
import time

import psutil

from llmesh.stack.layout import StackLayout


def stack_processes(layout: StackLayout) -> dict[str, list[psutil.Process]]:
    """Every live process of the stack by component: each process the stack started with its
    descendants; infer's tritonserver counts as `tritonserver`, Triton's stubs as `triton-stubs`."""
    found: dict[str, list[psutil.Process]] = {}
    leaders = {path.stem: int(path.read_text()) for path in layout.pids.glob("*.pid")}
    for name, pid in leaders.items():
        try:
            members = _members(psutil.Process(pid), set(leaders.values()))
        except psutil.NoSuchProcess:
            continue
        for proc in members:
            found.setdefault(_component(proc, name), []).append(proc)
    return found


def _members(leader: psutil.Process, leaders: set[int]) -> list[psutil.Process]:
    """`leader` and its descendants, but not a process the stack started itself (the supervisor's
    restarts are its children) nor what is below that one: each counts once, under its own name."""
    members = [leader]
    for child in leader.children():
        if child.pid not in leaders:
            with contextlib.suppress(psutil.NoSuchProcess):
                members += _members(child, leaders)
    return members


def _component(proc: psutil.Process, started_as: str) -> str:
    try:
        if "triton_python_backend_stub" in " ".join(proc.cmdline()):
            return "triton-stubs"
        return "tritonserver" if proc.name() == "tritonserver" else started_as
    except psutil.Error:
        return started_as


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def cpu_percent(layout: StackLayout, seconds: float) -> dict[str, float]:
    """Percent of one core used by each component over `seconds`, and the stack's total."""
    procs = stack_processes(layout)
    before = {name: _cpu_seconds(group) for name, group in procs.items()}
    time.sleep(seconds)
    used = {name: round(100 * (_cpu_seconds(group) - before[name]) / seconds, 1) for name, group in procs.items()}
    return {**dict(sorted(used.items())), "total": round(sum(used.values()), 1)}


def rss_mb(layout: StackLayout) -> dict[str, float]:
    """Resident memory of each component in MB (stubs summed)."""
    out: dict[str, float] = {}
    for name, group in stack_processes(layout).items():
        total = 0
        for proc in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        out[name] = round(total / 2**20, 1)
    return dict(sorted(out.items()))
