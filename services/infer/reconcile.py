"""Each infer replica reconciles its Triton to the desired state of every model, level-triggered:
it loads (from the model store) and warms what the desired and routed roles need, reports what it is
ready with, unloads what nothing needs any more, and moves the routing that gateways read once every
live replica is ready with the version that gains traffic.

Keys: llmesh/common/fleet.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Histogram

from llmesh.common.events import ReleaseEvent
from llmesh.common.fleet import REPLICAS, heartbeat_key, ready_entry, ready_key
from llmesh.common.outages import REDIS_ERRORS
from llmesh.common.registry import Registry, Routing, VersionRecord, VersionState
from llmesh.common.tasks import cancel
from llmesh.v1 import events_pb2
from services.infer.repository import ModelRepository, ModelStore
from services.infer.served import LoadedVersion, ServedVersions
from services.infer.settings import InferSettings
from services.infer.triton import TritonGenerator

log = logging.getLogger("llmesh.infer.reconcile")
BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 60, 120)
LOAD_SECONDS = Histogram("llmesh_infer_load_seconds", "Stage and load a version in Triton", buckets=BUCKETS)
WARMUP_SECONDS = Histogram("llmesh_infer_warmup_seconds", "Warm-up generation of a freshly loaded version", buckets=BUCKETS)
LOAD_FAILURES = Counter("llmesh_infer_reconcile_load_failures_total", "Versions the desired state needs that did not load")
EXCLUDED = Counter("llmesh_infer_replicas_excluded_total", "Routing moved without a live replica that was not ready in time")

StatusSink = Callable[[ReleaseEvent | None, str, int, str, str], Awaitable[None]]  # event, model, version, state, reason


def _why(desired: Routing, version: int, otherwise: str = "") -> str:
    """The reason of the event that named `version` last, for the state change it causes."""
    return desired.reason if version == desired.event_version and desired.reason else otherwise


class VersionStates:
    """Writes a version's mesh-wide state to the registry and announces it on the status topic."""

    def __init__(self, registry: Registry, status: StatusSink) -> None:
        self.registry, self.status = registry, status

    async def set(
        self, model: str, record: VersionRecord, state: VersionState, reason: str = "", event: ReleaseEvent | None = None
    ) -> None:
        record.state, record.reason = state, reason
        await self.registry.set_state(model, record)
        await self.status(event, model, record.version, state.value, reason)


class Reconciler:
    def __init__(
        self,
        settings: InferSettings,
        registry: Registry,
        triton: TritonGenerator,
        repository: ModelRepository,
        store: ModelStore,
        served: ServedVersions,
        states: VersionStates,
    ) -> None:
        self.settings, self.registry, self.triton = settings, registry, triton
        self.repository, self.store, self.served, self.states = repository, store, served, states
        self.replica = settings.replica
        self.applying: set[tuple[str, int]] = set()  # loaded by the release being applied: not unloaded meanwhile
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._loading = asyncio.Semaphore(settings.load_concurrency)  # a restart loads every needed version
        self._loop: asyncio.Task[None] | None = None
        self._retiring: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._reported: set[str] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel(self._loop)
        for task in list(self._retiring.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.registry.redis.delete(ready_key(self.replica))

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval_s)
            self._wake.clear()
            try:
                await self.reconcile()
            except REDIS_ERRORS as err:  # an outage: the next pass finds the state again
                log.warning("reconcile failed: Redis is unreachable", extra={"error": str(err)})
            except Exception:
                log.exception("reconcile failed; trying again")

    # ---- one pass ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        async with self._lock:
            await asyncio.gather(*(self._model(model) for model in await self.registry.models()))
            await self._report_ready()

    async def _model(self, model: str) -> None:
        desired, routing = await self.registry.desired(model), await self.registry.routing(model)
        records = {r.version: r for r in await self.registry.versions(model)}
        needed = self._needed(desired, routing)
        missing = [r for v in sorted(needed) if (r := records.get(v)) and r.digest and not self._loaded_as(model, r)]
        await asyncio.gather(*(self._load_needed(model, record) for record in missing))
        await self._report_ready()
        await self._route(model, desired, routing, records)
        for loaded in self.served.of_model(model):
            if loaded.version not in needed and (model, loaded.version) not in self.applying:
                self._retire_later(loaded)

    def _needed(self, desired: Routing, routing: Routing) -> set[int]:
        """Primary and candidate, desired and routed (the old primary serves until the flip), the
        release that waits for approval (approval routes it at once), and the previous version for
        `keep_previous_s` after the flip (instant rollback)."""
        roles = (desired.primary, desired.candidate, desired.pending_version(), routing.primary, routing.candidate)
        needed = {v for v in roles if v}
        if routing.previous and time.time() < routing.flipped_at + self.settings.keep_previous_s:
            needed.add(routing.previous)
        return needed

    def _loaded_as(self, model: str, record: VersionRecord) -> bool:
        loaded = self.served.get(model, record.version)
        return loaded is not None and loaded.digest == record.digest

    async def _load_needed(self, model: str, record: VersionRecord) -> None:
        try:
            async with self._loading:
                await self.load(model, record)
        except Exception as err:
            LOAD_FAILURES.inc()
            log.error(
                "could not load a version the desired state needs",
                extra={"model": model, "version": record.version, "error": str(err)},
            )

    async def load(self, model: str, record: VersionRecord) -> None:
        """Stage `record` from the model store into this replica's Triton, load and warm it."""
        started = time.perf_counter()
        triton_model = self.repository.name_of(model, record.version)
        loaded = self.served.get(model, record.version)
        if (
            loaded is None
            and self.repository.staged_digest(triton_model) == record.digest
            and await self.triton.is_ready(triton_model)
        ):
            self.served.add(model, record.version, triton_model, record.digest)  # Triton kept it while infer restarted
            return
        files = await asyncio.to_thread(self.store.files, record.digest, record.sha256)
        await asyncio.to_thread(self.repository.stage, model, record.version, files, record.digest)
        await asyncio.wait_for(self.triton.load(triton_model), self.settings.load_timeout_s)
        LOAD_SECONDS.observe(time.perf_counter() - started)
        warm_started = time.perf_counter()
        await self.warm_up(triton_model)
        WARMUP_SECONDS.observe(time.perf_counter() - warm_started)
        self.served.replace(model, record.version, triton_model, record.digest)
        self.wake()

    async def warm_up(self, triton_model: str) -> None:
        sampling = events_pb2.ResolvedSampling(max_tokens=self.settings.warmup_tokens, temperature=0.0, top_p=1.0)
        async for _ in self.triton.generate(triton_model, f"warmup-{triton_model}", [0], sampling, timeout=60):
            pass

    async def _report_ready(self) -> None:
        entries = {ready_entry(v.model, v.version, v.digest) for v in self.served.all()}
        if entries == self._reported:
            return
        async with self.registry.redis.pipeline(transaction=True) as pipe:
            pipe.delete(ready_key(self.replica))
            if entries:
                pipe.sadd(ready_key(self.replica), *entries)
            await pipe.execute()
        self._reported = entries

    # ---- routing -----------------------------------------------------------------------------

    async def _route(self, model: str, desired: Routing, routing: Routing, records: dict[int, VersionRecord]) -> None:
        """Move the routing toward the desired roles: a candidate goes at once, a version gains
        traffic once every live replica is ready with it (or the others ran out of time)."""
        if not desired.candidate and routing.candidate:
            await self.registry.set_candidate(model, 0, "", 0)
        primary = records.get(desired.primary)
        if primary is not None and desired.primary != routing.primary:
            await self._flip_primary(model, primary, desired, routing, records)
        candidate = records.get(desired.candidate)
        wanted = (desired.candidate, desired.candidate_mode, desired.candidate_share)
        if candidate is not None and wanted != (routing.candidate, routing.candidate_mode, routing.candidate_share):
            await self._set_candidate(model, candidate, desired)

    async def _flip_primary(
        self, model: str, primary: VersionRecord, desired: Routing, routing: Routing, records: dict[int, VersionRecord]
    ) -> None:
        if not await self._ready_everywhere(model, primary, desired):
            return
        if not await self.registry.flip_primary(model, primary.version, routing.primary):
            return  # another replica flipped it
        await self.states.set(model, primary, VersionState.SERVING, _why(desired, primary.version))
        if routing.primary and (old := records.get(routing.primary)):
            await self.states.set(model, old, VersionState.READY, "previous version: kept warm for rollback")

    async def _set_candidate(self, model: str, candidate: VersionRecord, desired: Routing) -> None:
        if not await self._ready_everywhere(model, candidate, desired):
            return
        if await self.registry.set_candidate(model, candidate.version, desired.candidate_mode, desired.candidate_share):
            reason = f"{desired.candidate_mode} candidate at {desired.candidate_share}%"
            await self.states.set(model, candidate, VersionState.READY, reason)

    async def _ready_everywhere(self, model: str, record: VersionRecord, desired: Routing) -> bool:
        live = await self.live_replicas()
        entry = ready_entry(model, record.version, record.digest)
        ready = {r for r in live if await self.registry.redis.sismember(ready_key(r), entry)}
        if self._loaded_as(model, record):
            ready.add(self.replica)
        missing = live - ready
        if not missing:
            return True
        if ready and time.time() > desired.updated_at + self.settings.ready_timeout_s:
            EXCLUDED.inc(len(missing))
            log.warning(
                "routing without replicas that are not ready in time",
                extra={"model": model, "version": record.version, "excluded": sorted(missing)},
            )
            return True
        return False

    async def live_replicas(self) -> set[str]:
        replicas = sorted(str(r) for r in await self.registry.redis.smembers(REPLICAS))
        beats = await self.registry.redis.mget([heartbeat_key(r) for r in replicas]) if replicas else []
        return {r for r, beat in zip(replicas, beats, strict=True) if beat is not None} | {self.replica}

    # ---- unloading ---------------------------------------------------------------------------

    def _retire_later(self, loaded: LoadedVersion) -> None:
        key = (loaded.model, loaded.version)
        if key not in self._retiring:
            task = asyncio.create_task(self._retire(loaded))
            self._retiring[key] = task
            task.add_done_callback(lambda _: self._retiring.pop(key, None))

    async def _retire(self, loaded: LoadedVersion) -> None:
        """After a grace time for requests still in transit, drain and unload a version nothing needs."""
        await asyncio.sleep(self.settings.retire_grace_s)
        desired, routing = await self.registry.desired(loaded.model), await self.registry.routing(loaded.model)
        if self.served.get(loaded.model, loaded.version) is not loaded or loaded.version in self._needed(desired, routing):
            return  # retired already, or needed again meanwhile
        record = await self.registry.version(loaded.model, loaded.version) or VersionRecord(version=loaded.version)
        if record.state in (VersionState.READY, VersionState.SERVING):
            reason = _why(desired, loaded.version, "no longer routed: finishing in-flight requests")
            await self.states.set(loaded.model, record, VersionState.DRAINING, reason)
        deadline = time.monotonic() + self.settings.drain_seconds
        while loaded.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.served.remove(loaded.model, loaded.version)
        await self._report_ready()
        await self.triton.unload(loaded.triton_model)
        self.repository.remove(loaded.triton_model)
        record = await self.registry.version(loaded.model, loaded.version) or record
        if record.state is not VersionState.RETIRED:
            await self.states.set(loaded.model, record, VersionState.RETIRED, _why(desired, loaded.version, "unloaded"))

    # ---- Triton restarted --------------------------------------------------------------------

    async def reload_served(self) -> None:
        """Triton came back empty (it restarted): load and warm again every version this replica serves."""
        for loaded in self.served.all():
            if not await self.triton.is_ready(loaded.triton_model):
                await asyncio.wait_for(self.triton.load(loaded.triton_model), self.settings.load_timeout_s)
                await self.warm_up(loaded.triton_model)
                log.info("reloaded after a Triton restart", extra={"model": loaded.model, "version": loaded.version})
