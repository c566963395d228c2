"""Applies a release event once for the whole mesh. Every infer replica reads every event; the one
that claims it computes the transition of the model's desired state, verifies and stores new
artifacts and proves they load in its own Triton, then commits the desired state. Every replica's
reconciler (reconcile.py) then loads what the state needs, and the routing follows once all are ready.

  event ─▶ claim ─▶ transition(state, event, policy) ─▶ verify + store + load here ─▶ commit desired ─▶ reconcile

A release the policy gates is staged and loaded the same way, in state PENDING_APPROVAL: the desired
state keeps it loaded on every replica and routes nothing to it until approve events apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from prometheus_client import Counter, Histogram

from llmesh.common.approval import Governance, PendingApproval
from llmesh.common.audit import AuditAction, AuditEntry, AuditSource, AuditTrail
from llmesh.common.desired import ModelState, Transition, transition
from llmesh.common.events import InvalidEvent, ReleaseEvent
from llmesh.common.registry import EventClaim, Registry, Routing, VersionRecord, VersionState, tokenizer_file_names
from llmesh.common.tasks import cancel
from llmesh.common.tokenizers import TokenizerCatalog
from llmesh.common.validation import bounded
from services.infer.reconcile import Reconciler, VersionStates
from services.infer.repository import ModelStore, verify_release
from services.infer.settings import InferSettings

log = logging.getLogger("llmesh.infer.releases")
CLAIM_HOLD_S = 5.0  # a claim lapses this long after its replica stopped renewing it
RELEASE_EVENTS = Counter(
    "llmesh_infer_release_events_total",
    "Release events by outcome (applied, pending approval, refused), counted once by the replica that decided",
    ["mode", "outcome"],  # no model label: a hostile client's refused events would make one series per name
)
SWAP_SECONDS = Histogram(
    "llmesh_infer_swap_seconds", "Release event applied to traffic routed", buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 60, 120)
)


class ReleaseApplier:
    def __init__(
        self,
        settings: InferSettings,
        registry: Registry,
        store: ModelStore,
        reconciler: Reconciler,
        catalog: TokenizerCatalog,
        states: VersionStates,
    ) -> None:
        self.settings, self.registry, self.store = settings, registry, store
        self.reconciler, self.catalog, self.states = reconciler, catalog, states
        self.governance = Governance.load(settings.policy_file)

    async def handle(self, event: ReleaseEvent, offset: int) -> bool:
        """Apply `event` unless it was applied (True if this replica applied it). Raises InvalidEvent
        in the one replica that refuses it first: that one dead-letters it."""
        signed = False
        try:
            event.check_signature(self.settings.release_key(), self.settings.signer_keys())
            signed = True
            claim = await self._claim(event, offset)
            if claim is EventClaim.REPLAY:
                return False
            if claim is EventClaim.DUPLICATE:
                raise InvalidEvent(f"duplicate event id {event.event_id}: it was applied already")
        except InvalidEvent as err:
            if await self.registry.mark_refused(event.event_id, offset):
                await self._audit(AuditAction.RELEASE_REFUSED, event, offset, str(err), signed)
                raise
            return False
        holding = asyncio.create_task(self._hold(event.event_id))
        try:
            step = await self._apply(event, offset)
        except BaseException as err:
            await cancel(holding)
            first = isinstance(err, InvalidEvent) and await self.registry.mark_refused(event.event_id, offset)
            if first:
                await self._audit(AuditAction.RELEASE_REFUSED, event, offset, str(err), signed)
            await self.registry.release_claim(event.event_id)  # after marking: no replica applies it meanwhile
            if first or not isinstance(err, InvalidEvent):
                raise
            return False
        await cancel(holding)
        await self._audit(
            AuditAction.RELEASE_PENDING if step.pending else AuditAction.RELEASE_APPLIED, event, offset, event.reason, signed
        )
        return True

    async def _audit(self, action: AuditAction, event: ReleaseEvent, offset: int, reason: str, signed: bool) -> None:
        """One entry (and count) per event and outcome, whichever replica got there (a replay adds nothing). The
        author of an event whose signature failed is only a claim: it is kept apart, not as the actor."""
        RELEASE_EVENTS.labels(event.mode.value, action.removeprefix("release.")).inc()
        entry = AuditEntry(
            id=f"{action}:{event.event_id}:{offset}",
            action=action,
            source=AuditSource.KAFKA,
            actor=event.author if signed else "",
            actor_key_id=event.signer if signed else "",  # a named signer's key; "" for the shared release key
            model=event.model,
            version=event.version,
            reason=bounded(reason),
            event_id=event.event_id,
            offset=offset,
            details={"mode": event.mode.value, "share_percent": str(event.share_percent), "label": event.label}
            | ({} if signed else {"claimed_author": event.author}),
        )
        await AuditTrail(self.registry.redis).append(entry)

    async def _hold(self, event_id: str) -> None:
        while True:
            await asyncio.sleep(CLAIM_HOLD_S / 5)
            await self.registry.hold_claim(event_id, CLAIM_HOLD_S)

    async def _claim(self, event: ReleaseEvent, offset: int) -> EventClaim:
        """Events are applied in log order: while another replica applies this one, wait for it (if
        that replica dies, its claim lapses within CLAIM_HOLD_S and this one applies the event)."""
        while True:
            if await self.registry.was_refused(event.event_id, offset):
                return EventClaim.REPLAY
            claim = await self.registry.claim_event(event.event_id, offset, self.settings.replica, CLAIM_HOLD_S)
            if claim is not EventClaim.APPLYING:
                return claim
            await asyncio.sleep(0.05)

    async def _apply(self, event: ReleaseEvent, offset: int) -> Transition:
        started = time.perf_counter()
        state = ModelState(
            event.model,
            await self.registry.desired(event.model),
            {r.version: r for r in await self.registry.versions(event.model)},
        )
        step = transition(state, event, self.governance.for_model(event.model), time.time())
        if step.new_version is not None:
            await self._stage(event, step.new_version, step.pending)
        elif step.pending is not None:  # a candidate that serves its share keeps it while its promotion waits
            await self.registry.note(event.model, event.version, VersionState.PENDING_APPROVAL, _waiting(step.pending))
        step = step.opened(time.time())
        routed = step.state.versions.get(step.routed)
        if routed is not None:
            await self._wait_for_tokenizers(routed)
        desired = replace(step.state.roles, updated_at=time.time(), event_version=event.version, reason=event.reason)
        await self.registry.commit(event.model, desired, event.event_id, offset)
        self.reconciler.applying.discard((event.model, event.version))
        self.reconciler.wake()
        if routed is not None and await self._routed(event.model, desired):
            SWAP_SECONDS.observe(time.perf_counter() - started)
        return step

    async def _stage(self, event: ReleaseEvent, record: VersionRecord, pending: PendingApproval | None) -> None:
        """Verify the operator's artifacts, copy them into the model store (the last read of their
        folder), publish the tokenizer, load and warm the version here: READY (PENDING_APPROVAL
        when its routing waits), or FAILED and refused."""
        try:
            roots = self.settings.artifact_roots
            files = await asyncio.to_thread(verify_release, event, [*roots, self.store.root] if roots else [])
            stored = await asyncio.to_thread(self.store.put, record.digest, files)
            names = tokenizer_file_names(record.sha256)
            await self.registry.put_tokenizer(record.digest, {n: stored[n].read_text() for n in names})
            await self.states.set(event.model, record, VersionState.STAGED, event=event)  # gateways preload its tokenizer
            await self._load_tokenizer(event)
            await self.states.set(event.model, record, VersionState.LOADING, event=event)
            self.reconciler.applying.add((event.model, event.version))
            await self.reconciler.load(event.model, record)
        except InvalidEvent as err:
            await self._failed(event, record, str(err))
            raise
        except Exception as err:
            await self._failed(event, record, f"Triton could not load it: {err}")
            raise InvalidEvent(f"Triton could not load {event.model} v{event.version}: {err}") from err
        if pending is None:
            await self.states.set(event.model, record, VersionState.READY, event=event)
        else:
            await self.states.set(event.model, record, VersionState.PENDING_APPROVAL, _waiting(pending), event=event)

    async def _failed(self, event: ReleaseEvent, record: VersionRecord, reason: str) -> None:
        self.reconciler.applying.discard((event.model, event.version))
        await self.states.set(event.model, record, VersionState.FAILED, reason, event=event)

    async def _load_tokenizer(self, event: ReleaseEvent) -> None:
        try:
            await self.catalog.refresh(event.model, event.version)
        except Exception as err:
            raise InvalidEvent(f"the tokenizer of {event.model} v{event.version} does not load: {err}") from err

    async def _wait_for_tokenizers(self, record: VersionRecord) -> None:
        deadline = time.monotonic() + self.settings.tokenizer_wait_s
        while time.monotonic() < deadline:
            if await self.registry.tokenizer_replicas(record.digest):
                return
            await asyncio.sleep(0.02)
        log.warning("no gateway or tokenize replica reported the tokenizer; routing anyway", extra={"version": record.version})

    async def _routed(self, model: str, desired: Routing) -> bool:
        """Wait until the routing has the desired primary and candidate (events apply one at a time)."""
        deadline = time.monotonic() + self.settings.ready_timeout_s + 5
        while time.monotonic() < deadline:
            routing = await self.registry.routing(model)
            if (routing.primary, routing.candidate) == (desired.primary, desired.candidate):
                return True
            await asyncio.sleep(0.02)
        log.error("routing did not reach the desired state in time", extra={"model": model})
        return False


def _waiting(pending: PendingApproval) -> str:
    return f"waits for {pending.needed} approval(s): {pending.reason}".rstrip(": ")
