"""The desired state of one model and the one transition a release event makes to it.

`transition(state, event, governance, now)` is a pure function: no I/O, and the clock is an
argument. The infer replica that claims an event computes it once for the whole mesh and commits the
result to the registry; every infer replica then reconciles its Triton to the desired roles, and the
routing that gateways read follows once every live replica is ready (`services/infer/reconcile.py`).

A release that the governance policy gates is staged and loaded as any other, but its role change
waits in `roles.pending` until enough approve events arrive (then it applies at once, nothing is
left to load) or a reject event (or eval, when it expires) drops it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llmesh.common.approval import GATED_MODES, Governance, PendingApproval
from llmesh.common.events import InvalidEvent, ReleaseEvent, ReleaseMode
from llmesh.common.registry import Routing, VersionRecord, VersionState


@dataclass(frozen=True)
class ModelState:
    model: str
    roles: Routing = field(default_factory=Routing)
    versions: dict[int, VersionRecord] = field(default_factory=dict)

    def newest(self) -> int:
        """The newest version that did not fail: a new version must be newer."""
        return max((v for v, r in self.versions.items() if r.state is not VersionState.FAILED), default=0)


@dataclass(frozen=True)
class Transition:
    state: ModelState  # the desired state after the event
    new_version: VersionRecord | None = None  # artifacts to verify, store and load before committing
    routed: int = 0  # the version that gains traffic (primary or candidate), 0 if none
    pending: PendingApproval | None = None  # this event's routing waits for approval

    def opened(self, now: float) -> Transition:
        """The approval window opens once the version is loaded (`now`), not when its event arrived."""
        if self.pending is None:
            return self
        window = self.pending.expires_at - self.pending.requested_at
        pending = replace(self.pending, requested_at=now, expires_at=now + window)
        return replace(self, state=replace(self.state, roles=replace(self.state.roles, pending=pending)), pending=pending)


def transition(state: ModelState, event: ReleaseEvent, governance: Governance | None = None, now: float = 0.0) -> Transition:
    """What `event` makes of `state` under the model's `governance` at time `now`, or InvalidEvent
    saying why it cannot be applied."""
    governance = governance or Governance()
    pending = state.roles.pending
    if event.mode in (ReleaseMode.APPROVE, ReleaseMode.REJECT):
        return _decide(state, event, now)
    if pending and event.mode in GATED_MODES:
        raise InvalidEvent(
            f"version {pending.version} of {event.model} waits for approval; approve or reject it before another release"
        )
    new_version = event.mode in GATED_MODES and event.version not in state.versions
    if governance.require_provenance and new_version and event.provenance is None:
        raise InvalidEvent(f"the policy of {event.model} requires provenance (lineage) with every new version")
    step = _apply(state, event)
    needed = governance.approval.needed(event.mode, event.share_percent) if event.mode in GATED_MODES else 0
    if not needed or not step.routed:
        return step
    waiting = PendingApproval(
        version=event.version,
        mode=event.mode.value,
        share_percent=event.share_percent,
        event_id=event.event_id,
        author=event.author,
        reason=event.reason,
        requested_at=now,
        expires_at=now + governance.approval.expires_s,
        needed=needed,
        allow_self=governance.approval.allow_self,
    )
    gated = replace(step.state, roles=replace(state.roles, pending=waiting))
    return Transition(gated, new_version=step.new_version, pending=waiting)


def _decide(state: ModelState, event: ReleaseEvent, now: float) -> Transition:
    """An approval routes the pending release once it has enough; a rejection drops it."""
    pending = state.roles.pending
    if pending is None or pending.version != event.version:
        raise InvalidEvent(f"no release of {event.model} version {event.version} waits for approval")
    if event.mode is ReleaseMode.REJECT:
        return Transition(replace(state, roles=replace(state.roles, pending=None)))
    if refusal := pending.refusal(event.author, now):
        raise InvalidEvent(refusal)
    pending = pending.approved_by(event.author)
    if len(pending.approvals) < pending.needed:
        return Transition(replace(state, roles=replace(state.roles, pending=pending)))
    routed = _routed(replace(state.roles, pending=None), pending.version, ReleaseMode(pending.mode), pending.share_percent)
    return Transition(replace(state, roles=routed), routed=pending.version)


def _apply(state: ModelState, event: ReleaseEvent) -> Transition:
    if event.mode is ReleaseMode.SWAP:
        return _swap(state, event)
    if event.mode in (ReleaseMode.SHADOW, ReleaseMode.CANARY):
        return _candidate(state, event)
    if event.mode is ReleaseMode.ROLLBACK:
        return _rollback(state, event)
    return _retire(state, event)


def _record(state: ModelState, event: ReleaseEvent) -> VersionRecord:
    if event.version <= (newest := state.newest()):
        raise InvalidEvent(f"version {event.version} is not newer than {newest}, the newest version of {event.model}")
    return VersionRecord(
        version=event.version,
        label=event.label,
        artifact_uri=event.artifact_uri,
        sha256=event.sha256,
        digest=event.content_digest(),
        event_id=event.event_id,
        author=event.author,
        provenance=event.provenance,
    )


def _same_artifacts(record: VersionRecord, event: ReleaseEvent) -> None:
    """Promoting or re-sharing a loaded version takes no new artifacts."""
    if event.sha256 and event.content_digest() != record.digest:
        raise InvalidEvent(
            f"version {event.version} of {event.model} is loaded already with other artifacts; release new artifacts as a new version"
        )


def _routed(roles: Routing, version: int, mode: ReleaseMode, share_percent: int) -> Routing:
    """The roles once `version` gains its traffic: primary (a swap, a promoted candidate) or candidate."""
    if mode is not ReleaseMode.SWAP:
        return replace(roles, candidate=version, candidate_mode=mode.value, candidate_share=share_percent)
    promoted = replace(roles, primary=version, previous=roles.primary or roles.previous)
    return replace(promoted, candidate=0, candidate_mode="", candidate_share=0) if roles.candidate == version else promoted


def _swap(state: ModelState, event: ReleaseEvent) -> Transition:
    roles = state.roles
    if roles.candidate and event.version == roles.candidate:  # promotion: it is loaded already
        _same_artifacts(state.versions[roles.candidate], event)
        return Transition(replace(state, roles=_routed(roles, event.version, event.mode, 100)), routed=roles.candidate)
    record = _record(state, event)
    return Transition(
        _with(state, record, _routed(roles, event.version, event.mode, 100)), new_version=record, routed=event.version
    )


def _candidate(state: ModelState, event: ReleaseEvent) -> Transition:
    roles = state.roles
    if not roles.primary:
        raise InvalidEvent(f"{event.model} has no primary version to compare a {event.mode.value} candidate with")
    if roles.candidate and roles.candidate != event.version:
        raise InvalidEvent(f"{event.model} already has candidate version {roles.candidate}; promote or retire it first")
    share = _routed(roles, event.version, event.mode, event.share_percent)
    if roles.candidate == event.version:  # a new mode or share for the same candidate
        _same_artifacts(state.versions[event.version], event)
        return Transition(replace(state, roles=share), routed=event.version)
    record = _record(state, event)
    return Transition(_with(state, record, share), new_version=record, routed=event.version)


def _rollback(state: ModelState, event: ReleaseEvent) -> Transition:
    roles = state.roles
    if not state.versions:
        raise InvalidEvent(f"unknown model {event.model!r}: nothing to roll back")
    if event.version == roles.primary:
        raise InvalidEvent(f"version {event.version} of {event.model} is already the primary")
    if event.version == roles.pending_version():
        raise InvalidEvent(f"version {event.version} of {event.model} waits for approval; approve it instead")
    record = state.versions.get(event.version)
    if record is None or record.state is VersionState.FAILED or not record.digest:
        raise InvalidEvent(f"version {event.version} of {event.model} was never served; cannot roll back to it")
    back = replace(roles, primary=event.version, previous=roles.primary)
    if back.candidate == event.version:
        back = replace(back, candidate=0, candidate_mode="", candidate_share=0)
    return Transition(replace(state, roles=back), routed=event.version)


def _retire(state: ModelState, event: ReleaseEvent) -> Transition:
    roles = state.roles
    if not state.versions:
        raise InvalidEvent(f"unknown model {event.model!r}")
    if event.version == roles.candidate:  # rejecting a shadow, rolling back a canary
        roles = replace(roles, candidate=0, candidate_mode="", candidate_share=0)
    if event.version == roles.pending_version():  # as a rejection
        roles = replace(roles, pending=None)
    if event.version in (roles.primary, roles.previous):
        raise InvalidEvent(f"version {event.version} of {event.model} serves traffic or backs rollback; roll back or swap first")
    return Transition(replace(state, roles=roles))


def _with(state: ModelState, record: VersionRecord, roles: Routing) -> ModelState:
    return replace(state, roles=roles, versions={**state.versions, record.version: record})
