"""Keeps this replica's Triton serving. Given a command line, infer runs tritonserver itself: it
starts it before serving, starts it again when it dies, keeps it (and what it has loaded) when
infer starts afresh after losing the broker, and stops it after draining. Either way (its own
process or a sidecar that something else restarts), after any Triton outage it loads again every
version this replica serves."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

from llmesh.common.tasks import cancel
from services.infer.triton import TritonGenerator

log = logging.getLogger("llmesh.infer.tritonserver")
RESTARTS = Counter("llmesh_infer_triton_restarts_total", "Times infer started its tritonserver again after it died")
OUTAGES = Counter("llmesh_infer_triton_outages_total", "Times Triton stopped answering (crash, restart, sidecar gone)")
TRITON_UP = Gauge("llmesh_infer_triton_up", "1 while Triton answers and serves every version this replica serves")
PR_SET_PDEATHSIG = 1
KEPT_PID = "LLMESH_KEPT_TRITON_PID"  # handed from a process to itself across exec
STOP_TIMEOUT_S = 20.0


def _die_with_parent() -> None:
    """Runs in the child before exec: a kill -9 of infer must not leave its tritonserver behind."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonSupervisor:
    def __init__(
        self,
        triton: TritonGenerator,
        command: list[str],
        env: dict[str, str],
        reload: Callable[[], Awaitable[None]],
        *,
        period_s: float = 0.5,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.triton, self.command, self.env, self.reload = triton, command, env, reload
        self.period_s, self.start_timeout_s = period_s, start_timeout_s
        self.up = False
        self._pid: int | None = None  # the tritonserver this process runs
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start tritonserver (when infer runs it, unless it kept one across a fresh start) and wait
        until it answers; then watch it."""
        self._pid = _kept_pid()
        deadline = time.monotonic() + self.start_timeout_s
        while not await self.triton.is_live():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Triton at {self.triton.url} is not live after {self.start_timeout_s:.0f}s")
            if self.command and not self._running():
                self._spawn()  # again, e.g. when the port was still held by the one before
            await asyncio.sleep(self.period_s)
        self._set_up(True)
        self._watch = asyncio.create_task(self._keep_serving())

    def keep_across_fresh_start(self) -> None:
        """This process is about to run itself again (exec): the new one takes over this tritonserver
        with what it has loaded, instead of starting and loading everything again."""
        if self._running():
            os.environ[KEPT_PID] = str(self._pid)

    async def stop(self) -> None:
        await cancel(self._watch)
        if self._pid is None or not self._running():
            return
        os.killpg(self._pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._running() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self._running():
            os.killpg(self._pid, signal.SIGKILL)

    def _spawn(self) -> None:
        # The Python backend names its shared memory after this prefix; a tritonserver started with the
        # default prefix beside another (a second replica, or the one a killed infer left dying) tears
        # down the other's regions, and that one crashes.
        shm = f"--backend-config=python,shm-region-prefix-name=llmesh_{os.getpid()}_{secrets.token_hex(4)}_"
        command = self.command if any("shm-region-prefix-name" in arg for arg in self.command) else [*self.command, shm]
        process = subprocess.Popen(
            command,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: infer's SIGTERM reaches it only after the drain
            preexec_fn=_die_with_parent,
        )
        self._pid = process.pid
        log.info("tritonserver started", extra={"pid": self._pid})

    def _running(self) -> bool:
        """Is our tritonserver alive? (Reaps it once it has exited.)"""
        if self._pid is None:
            return False
        try:
            pid, _ = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    async def _keep_serving(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self._check()
            except Exception:
                log.exception("Triton check failed")

    async def _check(self) -> None:
        if not await self.triton.is_live():
            self._set_up(False)
            if self.command and not self._running():
                log.error("tritonserver died: starting it again", extra={"pid": self._pid})
                RESTARTS.inc()
                self._spawn()
        elif not self.up:
            await self.reload()
            self._set_up(True)
            log.info("Triton is back: every served version is loaded again")

    def _set_up(self, up: bool) -> None:
        if self.up and not up:
            OUTAGES.inc()
            log.error("Triton stopped answering: requests get UNAVAILABLE until it is back")
        self.up = up
        TRITON_UP.set(1 if up else 0)


def _kept_pid() -> int | None:
    """The tritonserver this process ran before it started afresh, if it is still alive."""
    kept = os.environ.pop(KEPT_PID, "")
    if not kept.isdigit():
        return None
    try:
        os.kill(int(kept), 0)
    except OSError:
        return None
    return int(kept)
