"""Start and stop the stack's local processes, each in its own process group with its own log.

Each started process leaves `pids/<name>.pid` and `pids/<name>.spec.json` (its command and
environment, mode 0600: it holds the stack's keys). A pid file whose process is dead is a crash: the
supervisor (llmesh/stack/supervisor.py) starts the spec again. `stop` removes the pid file before it
signals, under the same lock as the supervisor's check, so a stop on purpose is never undone."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from llmesh.stack.layout import StackLayout


class StartFailed(RuntimeError):
    pass


@contextlib.contextmanager
def locked(layout: StackLayout) -> Iterator[None]:
    """Serializes starting and stopping between the CLI, tests and the supervisor."""
    layout.pids.mkdir(parents=True, exist_ok=True)
    with (layout.pids / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def spec_of(layout: StackLayout, name: str) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment `name` was last started with."""
    path = layout.pids / f"{name}.spec.json"
    if not path.exists():
        return None
    spec = json.loads(path.read_text())
    return spec["argv"], spec["env"]


def start(layout: StackLayout, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    with locked(layout):
        return _start(layout, name, argv, env)


def _start(layout: StackLayout, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    layout.logs.mkdir(parents=True, exist_ok=True)
    # An empty working directory: Python puts the cwd on sys.path, and a folder there named like a
    # package (e.g. "triton") would shadow the real one inside Triton's python stubs.
    workdir = layout.home / "run"
    workdir.mkdir(exist_ok=True)
    with (layout.logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own group: stopping it also stops its children (Triton's stubs)
            cwd=workdir,
        )
    _write_pid(layout.pids / f"{name}.pid", proc.pid)
    spec = layout.pids / f"{name}.spec.json"
    spec.unlink(missing_ok=True)
    descriptor = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        json.dump({"argv": list(argv), "env": dict(env or {})}, f)
    return proc.pid


def restart_crashed(layout: StackLayout, name: str, pid: int) -> int | None:
    """Start `name` again if its pid file still names the dead `pid` (not stopped on purpose, not
    started again by someone else meanwhile); what is left of its process group goes first."""
    with locked(layout):
        path = layout.pids / f"{name}.pid"
        spec = spec_of(layout, name)
        if spec is None or not path.exists() or path.read_text().strip() != str(pid) or alive(pid):
            return None
        _signal_group(pid, signal.SIGKILL)  # e.g. a tritonserver whose infer died
        deadline = time.monotonic() + 10
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _reap(pid)
        return _start(layout, name, *spec)


def _write_pid(path: Path, pid: int) -> None:
    """Readers never see the file empty or half written: it appears whole, by rename."""
    staging = path.with_name(f"{path.name}.staging")
    staging.write_text(str(pid))
    os.replace(staging, path)


def read_pid(path: Path) -> int | None:
    """The pid in a pid file; None when there is none (stopped, or removed right now)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def pid_of(layout: StackLayout, name: str) -> int | None:
    pid = read_pid(layout.pids / f"{name}.pid")
    return pid if pid is not None and alive(pid) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) != "Z"


def child_named(pid: int, name: str) -> int | None:
    """A child process of `pid` running the executable `name` (e.g. infer's tritonserver)."""
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == name and alive(int(child)):
                    return int(child)
    return None


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(
        _state(int(p.name)) not in ("Z", "?") for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pgid
    )


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def stop(layout: StackLayout, name: str, timeout: float = 20.0) -> bool:
    """SIGTERM the process group, wait, then SIGKILL what is left. True if it was running."""
    with locked(layout):
        path = layout.pids / f"{name}.pid"
        if not path.exists():
            return False
        pgid = int(path.read_text())  # started with start_new_session: pid == pgid
        path.unlink()  # first: the supervisor must not start it again
    was_running = _group_alive(pgid)
    if was_running:
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            while _group_alive(pgid) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
    _reap(pgid)
    return was_running


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_for_port(port: int, timeout: float, name: str, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            raise StartFailed(f"{name} exited during start-up; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StartFailed(f"{name} did not open port {port} within {timeout:.0f}s")
