"""Keeps the embedded stack's processes alive, as a process manager or Kubernetes would: a process
whose pid file outlives it crashed (a stop on purpose removes the pid file first), and is started
again with the command and environment it was started with, at once the first time and then with
exponential backoff while it keeps crashing. Restarts are logged and counted in
`<home>/restarts.json`, which `llmesh status` shows.

Run by `llmesh up` as a process of the stack: `python -m llmesh.stack.supervisor HOME`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmesh.common import logs
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout

NAME = "supervisor"
POLL_S = 0.25
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a process that ran this long is healthy again: its backoff starts over
log = logging.getLogger("llmesh.supervisor")


@dataclass
class Watched:
    pid: int
    since: float
    crashes: int = 0  # in a row, without STABLE_S of running between them
    next_try: float = 0.0


def restarts_file(layout: StackLayout) -> Path:
    return layout.home / "restarts.json"


def restarts(layout: StackLayout) -> dict[str, dict[str, float]]:
    """Per process: how often the supervisor restarted it and when it did so last."""
    path = restarts_file(layout)
    return json.loads(path.read_text()) if path.exists() else {}


class Supervisor:
    def __init__(self, layout: StackLayout) -> None:
        self.layout = layout
        self.watched: dict[str, Watched] = {}
        self.counts = restarts(layout)

    def check(self) -> list[str]:
        """One pass over every pid file; returns the names started again."""
        now = time.monotonic()
        started = []
        for path in sorted(self.layout.pids.glob("*.pid")):
            name = path.stem
            pid = processes.read_pid(path)
            if pid is None:
                continue  # stopped (removed) right now
            if name == NAME:
                continue
            watched = self.watched.get(name)
            if watched is None or watched.pid != pid:
                watched = self.watched[name] = Watched(pid, now, watched.crashes if watched else 0)
            if processes.alive(pid):
                if now - watched.since > STABLE_S:
                    watched.crashes = 0
                continue
            if now < watched.next_try:
                continue
            if self._restart(name, watched, now):
                started.append(name)
        return started

    def _restart(self, name: str, watched: Watched, now: float) -> bool:
        new_pid = processes.restart_crashed(self.layout, name, watched.pid)
        if new_pid is None:
            return False
        watched.crashes += 1
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (watched.crashes - 1))
        self.watched[name] = Watched(new_pid, now, watched.crashes, now + backoff)
        entry = self.counts.setdefault(name, {"restarts": 0, "last_at": 0.0})
        entry["restarts"] += 1
        entry["last_at"] = time.time()
        self._save()
        log.warning(
            "restarted a crashed process",
            extra={
                "restarted": name,
                "old_pid": watched.pid,
                "pid": new_pid,
                "restarts": entry["restarts"],
                "next_backoff_s": backoff,
            },
        )
        return True

    def _save(self) -> None:
        path = restarts_file(self.layout)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.counts, indent=1))
        os.replace(staging, path)


def main(argv: list[str]) -> int:
    logs.configure(NAME, "INFO")
    layout = StackLayout.load(Path(argv[0]))
    if layout is None:
        log.error("no stack in this folder", extra={"home": argv[0]})
        return 2
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    supervisor = Supervisor(layout)
    log.info("supervising", extra={"home": str(layout.home)})
    while not stopping:
        try:
            supervisor.check()
        except Exception:
            log.exception("supervision pass failed")
        time.sleep(POLL_S)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
