"""The release transition is a pure function of (desired state, event): no I/O, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmesh.common.desired import ModelState, transition
from llmesh.common.events import InvalidEvent, Provenance, ReleaseEvent, ReleaseMode
from llmesh.common.registry import Routing, VersionRecord, VersionState

SHA = {"config.json": "a" * 64, "model.safetensors": "b" * 64, "tokenizer.json": "c" * 64}
OTHER = SHA | {"model.safetensors": "d" * 64}


def _event(version: int, mode: ReleaseMode = ReleaseMode.SWAP, sha: dict[str, str] = SHA, share: int = 100) -> ReleaseEvent:
    return ReleaseEvent(model="chat", version=version, artifact_uri="/m", sha256=sha, mode=mode, share_percent=share)


def _apply(state: ModelState, event: ReleaseEvent) -> ModelState:
    """Apply as the registry would: the new version's record becomes READY once it loaded."""
    step = transition(state, event)
    if step.new_version is not None:
        step.new_version.state = VersionState.READY
    return step.state


def _serving(*versions: int) -> ModelState:
    state = ModelState("chat")
    for version in versions:
        state = _apply(state, _event(version))
    return state


def test_a_swap_makes_a_new_primary_and_keeps_the_old_one_as_previous():
    step = transition(_serving(1), _event(2))
    assert (step.state.roles.primary, step.state.roles.previous) == (2, 1)
    assert step.new_version is not None and step.new_version.digest == _event(2).content_digest()
    assert step.routed == 2


def test_a_version_that_is_not_newer_is_refused():
    with pytest.raises(InvalidEvent, match="not newer than 2"):
        transition(_serving(1, 2), _event(2))


def test_a_failed_version_may_be_released_again_under_its_number():
    state = _serving(1)
    step = transition(state, _event(2, sha=OTHER))
    step.new_version.state = VersionState.FAILED  # type: ignore[union-attr]
    failed = ModelState("chat", state.roles, step.state.versions)  # the roles were never committed
    again = transition(failed, _event(2))
    assert again.new_version is not None and again.new_version.digest == _event(2).content_digest()


def test_promoting_the_candidate_takes_no_new_artifacts():
    state = _apply(_serving(1), _event(2, ReleaseMode.SHADOW, share=50))
    assert (state.roles.candidate, state.roles.candidate_mode, state.roles.candidate_share) == (2, "shadow", 50)
    with pytest.raises(InvalidEvent, match="other artifacts"):
        transition(state, _event(2, sha=OTHER))
    step = transition(state, _event(2))
    assert step.new_version is None, "a promotion loads nothing new"
    assert (step.state.roles.primary, step.state.roles.previous, step.state.roles.candidate) == (2, 1, 0)


def test_a_second_candidate_is_refused_and_a_candidate_needs_a_primary():
    state = _apply(_serving(1), _event(2, ReleaseMode.CANARY, share=30))
    with pytest.raises(InvalidEvent, match="already has candidate version 2"):
        transition(state, _event(3, ReleaseMode.SHADOW))
    with pytest.raises(InvalidEvent, match="no primary"):
        transition(ModelState("chat"), _event(1, ReleaseMode.CANARY))


def test_rollback_goes_back_and_refuses_what_never_served():
    state = _serving(1, 2)
    back = transition(state, _event(1, ReleaseMode.ROLLBACK))
    assert (back.state.roles.primary, back.state.roles.previous, back.new_version) == (1, 2, None)
    with pytest.raises(InvalidEvent, match="already the primary"):
        transition(state, _event(2, ReleaseMode.ROLLBACK))
    with pytest.raises(InvalidEvent, match="never served"):
        transition(state, _event(7, ReleaseMode.ROLLBACK))
    with pytest.raises(InvalidEvent, match="unknown model"):
        transition(ModelState("chat"), _event(1, ReleaseMode.ROLLBACK))


def test_retire_removes_a_candidate_but_never_what_serves():
    state = _apply(_serving(1, 2), _event(3, ReleaseMode.SHADOW))
    assert transition(state, _event(3, ReleaseMode.RETIRE)).state.roles.candidate == 0
    for serving in (1, 2):
        with pytest.raises(InvalidEvent, match="serves traffic or backs rollback"):
            transition(state, _event(serving, ReleaseMode.RETIRE))


MODES = st.sampled_from(list(ReleaseMode))
EVENTS = st.lists(st.tuples(st.integers(1, 6), MODES), max_size=12)


@given(EVENTS)
def test_any_sequence_keeps_the_roles_on_known_versions_and_refusals_change_nothing(events):
    state = ModelState("chat")
    for version, mode in events:
        before = state
        try:
            state = _apply(state, _event(version, mode))
        except InvalidEvent:
            assert state is before
            continue
        roles: Routing = state.roles
        for role in (roles.primary, roles.previous, roles.candidate):
            assert role == 0 or role in state.versions
        assert roles.candidate == 0 or roles.candidate != roles.primary
        assert isinstance(state.versions.get(version, VersionRecord(version=version)), VersionRecord)


@given(EVENTS)
def test_the_transition_is_deterministic(events):
    def run() -> list[object]:
        state, seen = ModelState("chat"), []
        for version, mode in events:
            try:
                state = _apply(state, _event(version, mode))
                seen.append(state.roles)
            except InvalidEvent as err:
                seen.append(str(err))
        return seen

    assert run() == run()


def test_a_new_version_keeps_the_author_and_lineage_its_event_declared():
    lineage = Provenance(base_model="chat@1", training_data_digest="e" * 64, evaluation={"rouge_l": 0.5})
    event = _event(2).model_copy(update={"author": "ci-pipeline", "provenance": lineage})
    step = transition(_serving(1), event)
    assert step.new_version is not None
    assert (step.new_version.author, step.new_version.provenance) == ("ci-pipeline", lineage)
    stored = VersionRecord.model_validate_json(step.new_version.model_dump_json())  # as the registry keeps it
    assert stored.provenance == lineage
