"""Applies release events to this replica's Triton: hot swap, rollback, retire; and restores the
versions the registry says are needed after a restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from prometheus_client import Histogram

from llmesh.common.events import InvalidEvent, ReleaseEvent, ReleaseMode
from llmesh.common.registry import EventClaim, Registry, Routing, VersionRecord
from llmesh.common.tokenizers import TokenizerCatalog
from llmesh.v1 import events_pb2
from services.infer.repository import ModelRepository, verify_artifacts
from services.infer.served import LoadedVersion, ServedVersions
from services.infer.settings import InferSettings
from services.infer.triton import TritonGenerator

log = logging.getLogger("llmesh.infer.releases")
BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 60, 120)
LOAD_SECONDS = Histogram("llmesh_infer_load_seconds", "Verify, stage and load a version in Triton", buckets=BUCKETS)
WARMUP_SECONDS = Histogram("llmesh_infer_warmup_seconds", "Warm-up generation of a freshly loaded version", buckets=BUCKETS)
SWAP_SECONDS = Histogram("llmesh_infer_swap_seconds", "Release event received to traffic routed", buckets=BUCKETS)

StatusSink = Callable[[ReleaseEvent | None, str, int, str, str], Awaitable[None]]  # event, model, version, state, reason


class ReleaseApplier:
    def __init__(
        self,
        settings: InferSettings,
        registry: Registry,
        triton: TritonGenerator,
        repository: ModelRepository,
        served: ServedVersions,
        catalog: TokenizerCatalog,
        status: StatusSink,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.triton = triton
        self.repository = repository
        self.served = served
        self.catalog = catalog
        self.status = status
        self._retiring: set[asyncio.Task[None]] = set()

    async def handle(self, event: ReleaseEvent, offset: int) -> bool:
        """Apply `event`; False if it was applied before (a replay). Raises InvalidEvent to refuse it."""
        event.check_signature(self.settings.release_key())
        claim = await self.registry.claim_event(event.event_id, offset)
        if claim is EventClaim.REPLAY:
            return False
        if claim is EventClaim.DUPLICATE:
            raise InvalidEvent(f"duplicate event id {event.event_id}: it was applied already")
        try:
            await self._apply(event)
        except BaseException:
            await self.registry.release_claim(event.event_id)
            raise
        return True

    async def _apply(self, event: ReleaseEvent) -> None:
        started = time.perf_counter()
        if event.mode is ReleaseMode.SWAP:
            await self._swap(event)
        elif event.mode in (ReleaseMode.SHADOW, ReleaseMode.CANARY):
            await self._candidate(event)
        elif event.mode is ReleaseMode.ROLLBACK:
            await self._rollback(event)
        else:
            await self._retire_now(event)
        if event.mode is not ReleaseMode.RETIRE:
            SWAP_SECONDS.observe(time.perf_counter() - started)

    # ---- modes ---------------------------------------------------------------------------------

    async def _swap(self, event: ReleaseEvent) -> None:
        routing = await self.registry.routing(event.model)
        if routing.candidate and event.version == routing.candidate:
            await self._promote(event, routing)
            return
        record = await self._new_version(event)
        await self._load(event, record)
        await self._route(event, record)

    async def _new_version(self, event: ReleaseEvent) -> VersionRecord:
        known = [r.version for r in await self.registry.versions(event.model) if r.state != "FAILED"]
        if known and event.version <= max(known):
            raise InvalidEvent(f"version {event.version} is not newer than {max(known)}, the newest version of {event.model}")
        return VersionRecord(
            version=event.version,
            label=event.label,
            artifact_uri=event.artifact_uri,
            sha256=event.sha256,
            event_id=event.event_id,
        )

    async def _candidate(self, event: ReleaseEvent) -> None:
        """shadow / canary: load a new version beside the primary and give it a share of traffic."""
        routing = await self.registry.routing(event.model)
        if not routing.primary:
            raise InvalidEvent(f"{event.model} has no primary version to compare a {event.mode.value} candidate with")
        if routing.candidate and routing.candidate != event.version:
            raise InvalidEvent(f"{event.model} already has candidate version {routing.candidate}; promote or retire it first")
        record = await self.registry.version(event.model, event.version)
        if record is None or event.version != routing.candidate:
            record = await self._new_version(event)
            await self._load(event, record)
        await self._wait_for_tokenizers(event.model, event.version)
        await self.registry.set_candidate(event.model, event.version, event.mode.value, event.share_percent)
        await self._set(event, record, "READY", f"{event.mode.value} candidate at {event.share_percent}%")

    async def _promote(self, event: ReleaseEvent, routing: Routing) -> None:
        """A swap release of the current candidate: it becomes the primary (it is loaded already)."""
        record = await self.registry.version(event.model, routing.candidate)
        assert record is not None
        await self.registry.clear_candidate(event.model)
        await self._route(event, record, reason=event.reason or "promoted from candidate")

    async def _rollback(self, event: ReleaseEvent) -> None:
        if event.model not in await self.registry.models():
            raise InvalidEvent(f"unknown model {event.model!r}: nothing to roll back")
        routing = await self.registry.routing(event.model)
        if event.version == routing.primary:
            raise InvalidEvent(f"version {event.version} of {event.model} is already the primary")
        record = await self.registry.version(event.model, event.version)
        if record is None or record.state == "FAILED":
            raise InvalidEvent(f"version {event.version} of {event.model} was never served; cannot roll back to it")
        if self.served.get(event.model, event.version) is None:
            await self._load(event, record)  # kept-warm time ran out: load it again
        await self._route(event, record)

    async def _retire_now(self, event: ReleaseEvent) -> None:
        if event.model not in await self.registry.models():
            raise InvalidEvent(f"unknown model {event.model!r}")
        routing = await self.registry.routing(event.model)
        if event.version == routing.candidate:  # rejecting a shadow, rolling back a canary
            await self.registry.clear_candidate(event.model)
            routing = await self.registry.routing(event.model)
        if event.version in routing.needed():
            raise InvalidEvent(
                f"version {event.version} of {event.model} serves traffic or backs rollback; roll back or swap first"
            )
        loaded = self.served.get(event.model, event.version)
        if loaded is not None:
            self._spawn(self._retire(loaded, grace_s=self.settings.retire_grace_s, reason=event.reason))

    # ---- steps ---------------------------------------------------------------------------------

    async def _load(self, event: ReleaseEvent, record: VersionRecord) -> None:
        """Verify and stage (STAGED), load (LOADING) and warm `record`: READY, or FAILED and refused."""
        source = event.model_copy(update={"artifact_uri": record.artifact_uri, "sha256": record.sha256})
        started = time.perf_counter()
        try:
            files = await asyncio.to_thread(verify_artifacts, source, self.settings.artifact_roots)
            triton_model = await asyncio.to_thread(self.repository.stage, source, files)
            await self._set(event, record, "STAGED")  # gateways and tokenize preload the tokenizer from here on
            await self._load_tokenizer(event)
            await self._set(event, record, "LOADING")
            await asyncio.wait_for(self.triton.load(triton_model), self.settings.load_timeout_s)
            LOAD_SECONDS.observe(time.perf_counter() - started)
            warm_started = time.perf_counter()
            await self._warm_up(triton_model)
            WARMUP_SECONDS.observe(time.perf_counter() - warm_started)
        except InvalidEvent as err:
            await self._set(event, record, "FAILED", str(err))
            raise
        except Exception as err:
            await self._set(event, record, "FAILED", f"Triton could not load it: {err}")
            raise InvalidEvent(f"Triton could not load {event.model} v{event.version}: {err}") from err
        self.served.add(event.model, event.version, triton_model)
        await self._set(event, record, "READY")

    async def _route(self, event: ReleaseEvent, record: VersionRecord, reason: str = "") -> None:
        await self._wait_for_tokenizers(event.model, record.version)
        old = await self.registry.route_to(event.model, record.version)
        await self._set(event, record, "SERVING", reason)
        if old and old != record.version and (previous := await self.registry.version(event.model, old)):
            await self._set(event, previous, "READY", "previous version: kept warm for rollback")
        self._schedule_retirements(event.model)

    async def _load_tokenizer(self, event: ReleaseEvent) -> None:
        try:
            await self.catalog.get(event.model, event.version)
        except Exception as err:
            raise InvalidEvent(f"the tokenizer of {event.model} v{event.version} does not load: {err}") from err

    async def _wait_for_tokenizers(self, model: str, version: int) -> None:
        deadline = time.monotonic() + self.settings.tokenizer_wait_s
        while time.monotonic() < deadline:
            if await self.registry.tokenizer_replicas(model, version):
                return
            await asyncio.sleep(0.02)
        log.warning(
            "no gateway or tokenize replica reported the tokenizer; routing anyway", extra={"model": model, "version": version}
        )

    async def _warm_up(self, triton_model: str) -> None:
        sampling = events_pb2.ResolvedSampling(max_tokens=self.settings.warmup_tokens, temperature=0.0, top_p=1.0)
        async for _ in self.triton.generate(triton_model, f"warmup-{triton_model}", [0], sampling, timeout=60):
            pass

    def _schedule_retirements(self, model: str) -> None:
        """Versions no longer needed drain and unload after a grace time; the previous one after keep_previous_s."""
        self._spawn(self._retire_unneeded(model))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_unneeded(self, model: str) -> None:
        routing = await self.registry.routing(model)
        waits = []
        for loaded in self.served.of_model(model):
            if loaded.version == routing.previous:
                waits.append(self._retire(loaded, self.settings.keep_previous_s, previous_expired=True))
            elif loaded.version not in (routing.primary, routing.candidate):
                waits.append(self._retire(loaded, self.settings.retire_grace_s))
        await asyncio.gather(*waits)

    async def _retire(self, loaded: LoadedVersion, grace_s: float, *, previous_expired: bool = False, reason: str = "") -> None:
        await asyncio.sleep(grace_s)
        routing = await self.registry.routing(loaded.model)
        if self.served.get(loaded.model, loaded.version) is not loaded or loaded.version in (routing.primary, routing.candidate):
            return  # retired already, or routed to again meanwhile
        if loaded.version == routing.previous and not previous_expired:
            return
        record = await self.registry.version(loaded.model, loaded.version) or VersionRecord(version=loaded.version)
        await self._set(None, record, "DRAINING", reason or "no longer routed: finishing in-flight requests", model=loaded.model)
        deadline = time.monotonic() + self.settings.drain_seconds
        while loaded.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.served.remove(loaded.model, loaded.version)
        await self.triton.unload(loaded.triton_model)
        self.repository.remove(loaded.triton_model)
        await self._set(None, record, "RETIRED", reason or "unloaded", model=loaded.model)

    async def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()

    async def _set(
        self, event: ReleaseEvent | None, record: VersionRecord, state: str, reason: str = "", *, model: str = ""
    ) -> None:
        model = model or (event.model if event else "")
        record.state, record.reason = state, reason
        await self.registry.set_state(model, record)
        await self.status(event, model, record.version, state, reason)

    # ---- restart ------------------------------------------------------------------------------

    async def reload_served(self) -> None:
        """Triton came back empty (it restarted): load and warm again every version this replica serves."""
        for loaded in self.served.all():
            if not await self.triton.is_ready(loaded.triton_model):
                await asyncio.wait_for(self.triton.load(loaded.triton_model), self.settings.load_timeout_s)
                await self._warm_up(loaded.triton_model)
                log.info("reloaded after a Triton restart", extra={"model": loaded.model, "version": loaded.version})

    async def restore(self) -> None:
        """Load what the registry routes to (primary and previous) that this replica lacks."""
        for model in await self.registry.models():
            for version in sorted((await self.registry.routing(model)).needed()):
                record = await self.registry.version(model, version)
                if record is None or self.served.get(model, version):
                    continue
                triton_model = self.repository.name_of(model, version)
                if await self.triton.is_ready(triton_model):
                    self.served.add(model, version, triton_model)  # Triton kept it while we restarted
                    continue
                event = ReleaseEvent(
                    model=model, version=version, artifact_uri=record.artifact_uri, event_id=f"restore-{model}-{version}"
                )
                state = record.state
                try:
                    await self._load(event, record)
                except InvalidEvent as err:
                    log.error(
                        "could not restore a routed version", extra={"model": model, "version": version, "reason": str(err)}
                    )
                    continue
                await self._set(event, record, state, "restored after restart")
            self._schedule_retirements(model)
