"""The stack's supervisor on real processes: a crashed process comes back with its command and
environment, with backoff while it keeps crashing; a stop on purpose stays stopped."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from llmesh.stack import processes, supervisor
from llmesh.stack.layout import StackLayout

SLEEPER = [sys.executable, "-c", "import os, time; print(os.environ['MARK'], flush=True); time.sleep(600)"]


@pytest.fixture
def layout(tmp_path: Path) -> StackLayout:
    layout = StackLayout.create(tmp_path, free_ports=True, models_dir=tmp_path / "models")
    layout.save()
    return layout


def _wait_logged(layout: StackLayout, times: int) -> None:
    deadline = time.monotonic() + 30
    while (layout.logs / "sleeper.log").read_text().count("kept") < times:
        assert time.monotonic() < deadline, "the process did not start with its environment"
        time.sleep(0.05)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    while processes.alive(pid):
        time.sleep(0.01)


def test_a_killed_process_is_started_again_with_its_command_and_environment(layout):
    pid = processes.start(layout, "sleeper", SLEEPER, {"MARK": "kept"})
    watcher = supervisor.Supervisor(layout)
    assert watcher.check() == []
    _wait_logged(layout, 1)
    _kill(pid)
    assert watcher.check() == ["sleeper"]
    restarted = processes.pid_of(layout, "sleeper")
    assert restarted not in (None, pid)
    assert supervisor.restarts(layout)["sleeper"]["restarts"] == 1
    assert oct((layout.pids / "sleeper.spec.json").stat().st_mode & 0o777) == "0o600", "the spec holds the stack's keys"
    _wait_logged(layout, 2)  # the restarted process got the same environment
    processes.stop(layout, "sleeper")


def test_crashing_again_at_once_waits_out_a_growing_backoff(layout):
    pid = processes.start(layout, "sleeper", SLEEPER, {"MARK": "x"})
    watcher = supervisor.Supervisor(layout)
    watcher.check()
    _kill(pid)
    assert watcher.check() == ["sleeper"]  # the first restart is immediate
    _kill(processes.pid_of(layout, "sleeper") or 0)
    assert watcher.check() == [], "the second waits its backoff"
    assert watcher.watched["sleeper"].next_try - time.monotonic() > supervisor.FIRST_BACKOFF_S / 2
    watcher.watched["sleeper"].next_try = 0.0  # as if the backoff had passed
    assert watcher.check() == ["sleeper"]
    assert watcher.watched["sleeper"].crashes == 2
    assert supervisor.restarts(layout)["sleeper"]["restarts"] == 2
    processes.stop(layout, "sleeper")


def test_a_process_stopped_on_purpose_stays_stopped(layout):
    processes.start(layout, "sleeper", SLEEPER, {"MARK": "x"})
    watcher = supervisor.Supervisor(layout)
    watcher.check()
    assert processes.stop(layout, "sleeper")
    assert watcher.check() == []
    assert processes.pid_of(layout, "sleeper") is None
    assert "sleeper" not in supervisor.restarts(layout)


def test_the_supervisor_process_restarts_and_stops_cleanly(layout):
    pid = processes.start(layout, "sleeper", SLEEPER, {"MARK": "x"})
    processes.start(layout, supervisor.NAME, [sys.executable, "-m", "llmesh.stack.supervisor", str(layout.home)])
    try:
        _kill(pid)
        deadline = time.monotonic() + 20
        while processes.pid_of(layout, "sleeper") in (None, pid):
            assert time.monotonic() < deadline, "the supervisor did not start the sleeper again"
            time.sleep(0.05)
    finally:
        assert processes.stop(layout, supervisor.NAME), "it stops on SIGTERM"
        processes.stop(layout, "sleeper")
