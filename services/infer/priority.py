"""CPU priority of a Triton model's stub processes (the python backend runs each model instance in
its own process). A shadow or canary candidate sharing CPUs with the primary runs at a lower
priority, so mirroring does not slow the answers clients wait for. Linux niceness is per thread,
so every thread of each stub is changed. Works only where infer sees Triton's processes (the
embedded stack, or a shared process namespace); elsewhere it does nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("llmesh.infer.priority")


def _stub_pids(model_dir: Path) -> list[int]:
    needle = str(model_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"triton_python_backend_stub" in cmdline and needle in cmdline:
            pids.append(int(entry.name))
    return pids


def set_niceness(model_dir: Path, niceness: int) -> int:
    """Set the niceness of every thread of the stubs serving `model_dir`; returns threads changed."""
    changed = 0
    for pid in _stub_pids(model_dir):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
                changed += 1
            except (PermissionError, ProcessLookupError) as err:
                log.warning("could not change a stub thread's priority", extra={"pid": pid, "error": str(err)})
    return changed
