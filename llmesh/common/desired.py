"""The desired state of one model and the one transition a release event makes to it.

`transition(state, event)` is a pure function: no I/O, no clock. The infer replica that claims an
event computes it once for the whole mesh and commits the result to the registry; every infer
replica then reconciles its Triton to the desired roles, and the routing that gateways read follows
once every live replica is ready (`services/infer/reconcile.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


def transition(state: ModelState, event: ReleaseEvent) -> Transition:
    """What `event` makes of `state`, or InvalidEvent saying why it cannot be applied."""
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


def _swap(state: ModelState, event: ReleaseEvent) -> Transition:
    roles = state.roles
    if roles.candidate and event.version == roles.candidate:  # promotion: it is loaded already
        _same_artifacts(state.versions[roles.candidate], event)
        promoted = replace(
            roles, primary=roles.candidate, previous=roles.primary, candidate=0, candidate_mode="", candidate_share=0
        )
        return Transition(replace(state, roles=promoted), routed=roles.candidate)
    record = _record(state, event)
    new_roles = replace(roles, primary=event.version, previous=roles.primary or roles.previous)
    return Transition(_with(state, record, new_roles), new_version=record, routed=event.version)


def _candidate(state: ModelState, event: ReleaseEvent) -> Transition:
    roles = state.roles
    if not roles.primary:
        raise InvalidEvent(f"{event.model} has no primary version to compare a {event.mode.value} candidate with")
    if roles.candidate and roles.candidate != event.version:
        raise InvalidEvent(f"{event.model} already has candidate version {roles.candidate}; promote or retire it first")
    share = replace(roles, candidate=event.version, candidate_mode=event.mode.value, candidate_share=event.share_percent)
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
    if event.version in (roles.primary, roles.previous):
        raise InvalidEvent(f"version {event.version} of {event.model} serves traffic or backs rollback; roll back or swap first")
    return Transition(replace(state, roles=roles))


def _with(state: ModelState, record: VersionRecord, roles: Routing) -> ModelState:
    return replace(state, roles=roles, versions={**state.versions, record.version: record})
