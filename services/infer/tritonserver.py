"""Keeps this replica's Triton serving. Given a command line, infer runs tritonserver itself: it
starts it before serving, starts it again when it dies, and stops it after draining. Either way
(its own process or a sidecar that something else restarts), after any Triton outage it loads
again every version this replica serves."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

from services.infer.triton import TritonGenerator

log = logging.getLogger("llmesh.infer.tritonserver")
RESTARTS = Counter("llmesh_infer_triton_restarts_total", "Times infer started its tritonserver again after it died")
OUTAGES = Counter("llmesh_infer_triton_outages_total", "Times Triton stopped answering (crash, restart, sidecar gone)")
TRITON_UP = Gauge("llmesh_infer_triton_up", "1 while Triton answers and serves every version this replica serves")
PR_SET_PDEATHSIG = 1


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
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start tritonserver (when infer runs it) and wait until it answers; then watch it."""
        if self.command:
            await self._spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not await self.triton.is_live():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Triton at {self.triton.url} is not live after {self.start_timeout_s:.0f}s")
            if self._exited():
                await asyncio.sleep(self.period_s)  # e.g. its port is still held by the one before: try again
                await self._spawn()
            await asyncio.sleep(0.1)
        self._set_up(True)
        self._watch = asyncio.create_task(self._keep_serving())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        process = self._process
        if process is not None and process.returncode is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()

    def abandon(self) -> None:
        """This process is about to start afresh: let its tritonserver go (the new one starts its own)."""
        if self._process is not None and self._process.returncode is None:
            os.killpg(self._process.pid, signal.SIGTERM)

    async def _spawn(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            *self.command,
            env={**os.environ, **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own group: infer's SIGTERM reaches it only after the drain
            preexec_fn=_die_with_parent,
        )
        log.info("tritonserver started", extra={"pid": self._process.pid})

    def _exited(self) -> bool:
        return self._process is not None and self._process.returncode is not None

    async def _keep_serving(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self._check()
            except Exception:
                log.exception("Triton check failed")

    async def _check(self) -> None:
        if self._exited():
            assert self._process is not None
            log.error("tritonserver died: starting it again", extra={"returncode": self._process.returncode})
            self._set_up(False)
            RESTARTS.inc()
            await self._spawn()
            return
        if not await self.triton.is_live():
            self._set_up(False)
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
