"""Approval gates in the release transition: a gated release is staged and loaded but routed only
once enough other people approve it; the policy file that says which releases are gated."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmesh.common.approval import ApprovalRule, Governance, PendingApproval
from llmesh.common.desired import ModelState, transition
from llmesh.common.events import InvalidEvent, Provenance, ReleaseEvent, ReleaseMode
from llmesh.common.registry import Routing, VersionState
from services.eval.policy import PromotionPolicy

SHA = {"config.json": "a" * 64, "model.safetensors": "b" * 64, "tokenizer.json": "c" * 64}
GATED = Governance(approval=ApprovalRule(modes=["swap", "canary"], canary_share_above=10, approvals=2, expires_s=60))
NOW = 1_000.0


def _event(version: int, mode: ReleaseMode = ReleaseMode.SWAP, author: str = "alice", share: int = 100) -> ReleaseEvent:
    decides = mode in (ReleaseMode.APPROVE, ReleaseMode.REJECT)
    return ReleaseEvent(
        model="chat",
        version=version,
        artifact_uri="" if decides else "/m",
        sha256={} if decides else SHA,
        mode=mode,
        share_percent=share,
        author=author,
    )


def _step(state: ModelState, event: ReleaseEvent, governance: Governance = GATED, now: float = NOW) -> ModelState:
    step = transition(state, event, governance, now)
    if step.new_version is not None:
        step.new_version.state = VersionState.PENDING_APPROVAL if step.pending else VersionState.READY
    return step.state


def _pending_swap() -> ModelState:
    serving = _step(ModelState("chat"), _event(1), Governance())
    return _step(serving, _event(2, author="alice"))


def test_a_gated_swap_is_staged_but_not_routed():
    serving = _step(ModelState("chat"), _event(1), Governance())
    step = transition(serving, _event(2, author="alice"), GATED, NOW)
    assert step.new_version is not None and step.routed == 0, "it is loaded, and nothing is routed to it"
    roles = step.state.roles
    assert (roles.primary, roles.candidate) == (1, 0)
    assert roles.pending == PendingApproval(
        version=2,
        mode="swap",
        share_percent=100,
        event_id=step.pending.event_id if step.pending else "",
        author="alice",
        reason="",
        requested_at=NOW,
        expires_at=NOW + 60,
        needed=2,
        allow_self=False,
    )


def test_the_window_opens_once_the_version_is_loaded():
    serving = _step(ModelState("chat"), _event(1), Governance())
    step = transition(serving, _event(2), GATED, NOW).opened(NOW + 30)
    assert step.pending is not None and (step.pending.requested_at, step.pending.expires_at) == (NOW + 30, NOW + 90)
    assert step.state.roles.pending == step.pending
    assert transition(serving, _event(2), Governance(), NOW).opened(NOW + 30).state.roles.pending is None


def test_the_author_may_not_approve_their_own_release_and_nobody_twice():
    state = _pending_swap()
    with pytest.raises(InvalidEvent, match="'alice' released version 2 and may not approve it"):
        transition(state, _event(2, ReleaseMode.APPROVE, "alice"), GATED, NOW)
    once = _step(state, _event(2, ReleaseMode.APPROVE, "bob"))
    assert once.roles.pending is not None and once.roles.pending.approvals == ("bob",) and once.roles.primary == 1
    with pytest.raises(InvalidEvent, match="'bob' approved version 2 already"):
        transition(once, _event(2, ReleaseMode.APPROVE, "bob"), GATED, NOW)
    with pytest.raises(InvalidEvent, match="must name its approver"):
        transition(once, _event(2, ReleaseMode.APPROVE, ""), GATED, NOW)


def test_the_last_approval_routes_it_at_once():
    state = _step(_pending_swap(), _event(2, ReleaseMode.APPROVE, "bob"))
    step = transition(state, _event(2, ReleaseMode.APPROVE, "carol"), GATED, NOW)
    assert step.routed == 2 and step.new_version is None, "nothing left to load"
    assert (step.state.roles.primary, step.state.roles.previous, step.state.roles.pending) == (2, 1, None)


def test_an_approval_after_the_window_closed_is_refused():
    with pytest.raises(InvalidEvent, match="approval window of version 2 closed"):
        transition(_pending_swap(), _event(2, ReleaseMode.APPROVE, "bob"), GATED, NOW + 61)


def test_a_rejection_drops_it_and_anyone_may_reject():
    step = transition(_pending_swap(), _event(2, ReleaseMode.REJECT, "alice"), GATED, NOW)
    assert step.state.roles == Routing(primary=1), "the pending release is gone; version 2 is needed by nothing"


def test_no_other_release_while_one_waits_but_a_rollback_goes():
    state = _pending_swap()
    with pytest.raises(InvalidEvent, match="version 2 of chat waits for approval"):
        transition(state, _event(3), GATED, NOW)
    with pytest.raises(InvalidEvent, match="waits for approval; approve it instead"):
        transition(state, _event(2, ReleaseMode.ROLLBACK), GATED, NOW)
    retired = transition(state, _event(2, ReleaseMode.RETIRE), GATED, NOW)
    assert retired.state.roles.pending is None, "retiring the waiting version rejects it"


def test_decisions_name_a_release_that_waits():
    serving = _step(ModelState("chat"), _event(1), Governance())
    for mode in (ReleaseMode.APPROVE, ReleaseMode.REJECT):
        with pytest.raises(InvalidEvent, match="no release of chat version 1 waits for approval"):
            transition(serving, _event(1, mode, "bob"), GATED, NOW)
    with pytest.raises(InvalidEvent, match="version 3 waits"):
        transition(_pending_swap(), _event(3, ReleaseMode.APPROVE, "bob"), GATED, NOW)


def test_a_canary_is_gated_only_above_its_share_and_a_shadow_not_at_all():
    serving = _step(ModelState("chat"), _event(1), Governance())
    small = transition(serving, _event(2, ReleaseMode.CANARY, share=10), GATED, NOW)
    assert small.pending is None and small.state.roles.candidate == 2
    shadow = transition(serving, _event(2, ReleaseMode.SHADOW, share=100), GATED, NOW)
    assert shadow.pending is None and shadow.state.roles.candidate == 2
    canary = _step(small.state, _event(2, ReleaseMode.CANARY, share=50))
    assert canary.roles.candidate_share == 10, "the candidate keeps its share while the larger one waits"
    canary = _step(_step(canary, _event(2, ReleaseMode.APPROVE, "bob")), _event(2, ReleaseMode.APPROVE, "carol"))
    assert (canary.roles.candidate, canary.roles.candidate_mode, canary.roles.candidate_share) == (2, "canary", 50)


def test_promoting_a_candidate_waits_too_then_clears_the_candidate():
    serving = _step(ModelState("chat"), _event(1), Governance())
    shadowed = _step(serving, _event(2, ReleaseMode.SHADOW, share=100))
    waiting = transition(shadowed, _event(2, author="llmesh-eval policy"), GATED, NOW)
    assert waiting.new_version is None and waiting.pending is not None, "a loaded candidate: nothing to load"
    assert waiting.state.roles.candidate == 2, "it keeps its shadow traffic while its promotion waits"
    done = _step(_step(waiting.state, _event(2, ReleaseMode.APPROVE, "bob")), _event(2, ReleaseMode.APPROVE, "carol"))
    assert (done.roles.primary, done.roles.previous, done.roles.candidate) == (2, 1, 0)


def test_self_approval_when_the_policy_allows_it():
    allowing = Governance(approval=ApprovalRule(modes=["swap"], allow_self=True))
    serving = _step(ModelState("chat"), _event(1), Governance())
    state = _step(serving, _event(2, author="alice"), allowing)
    assert _step(state, _event(2, ReleaseMode.APPROVE, "alice"), allowing).roles.primary == 2


def test_a_policy_may_require_provenance_of_new_versions():
    strict = Governance(require_provenance=True)
    with pytest.raises(InvalidEvent, match="requires provenance"):
        transition(ModelState("chat"), _event(1), strict, NOW)
    declared = _event(1).model_copy(update={"provenance": Provenance(base_model="gpt2")})
    assert transition(ModelState("chat"), declared, strict, NOW).routed == 1


def test_the_pending_release_survives_the_desired_states_round_trip():
    roles = _pending_swap().roles
    roles = _step(ModelState("chat", roles), _event(2, ReleaseMode.APPROVE, "bob")).roles
    assert Routing.loads(roles.dumps()) == roles
    assert Routing.loads(Routing(primary=1).dumps()).pending is None


@given(
    modes=st.lists(st.sampled_from(["swap", "canary", "shadow"]), unique=True),
    mode=st.sampled_from([ReleaseMode.SWAP, ReleaseMode.CANARY, ReleaseMode.SHADOW]),
    above=st.integers(0, 100),
    share=st.integers(0, 100),
)
def test_a_rule_gates_exactly_its_modes_and_canaries_above_the_share(modes, mode, above, share):
    rule = ApprovalRule(modes=modes, canary_share_above=above, approvals=3)
    gated = mode.value in modes and not (mode is ReleaseMode.CANARY and share <= above)
    assert rule.needed(mode, share) == (3 if gated else 0)


def test_the_policy_file_holds_promotion_and_approval_and_each_service_reads_its_part(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "min_samples: 5\n"
        "approval: {modes: [swap], approvals: 1}\n"
        "models:\n"
        "  chat: {approval: {modes: [swap, canary], approvals: 2, expires_s: 600}, require_provenance: true}\n"
    )
    governance = Governance.load(path)
    assert governance.for_model("other").approval.modes == ["swap"]
    chat = governance.for_model("chat")
    assert (chat.approval.approvals, chat.approval.expires_s, chat.require_provenance) == (2, 600, True)
    assert PromotionPolicy.load(path).for_model("chat").min_samples == 5, "eval validates the whole file"
    path.write_text("approval: {modes: [deploy]}\n")
    with pytest.raises(ValueError, match="modes"):
        Governance.load(path)


# ---- named signers: each person or pipeline its own key, the author bound to it ------------------------

SIGNERS = {"alice": b"alice-key", "bob": b"bob-key"}


def test_a_named_signers_event_verifies_by_its_key_and_is_authored_by_it():
    event = _event(2).signed(SIGNERS["alice"], "alice")
    assert (event.signer, event.author) == ("alice", "alice")
    event.check_signature(b"shared-key", SIGNERS)
    with pytest.raises(InvalidEvent, match="bad signature"):
        _event(2).signed(SIGNERS["bob"], "alice").check_signature(b"shared-key", SIGNERS)
    with pytest.raises(InvalidEvent, match="unknown signer 'mallory'"):
        _event(2).signed(b"mallory-key", "mallory").check_signature(b"shared-key", SIGNERS)
    claims = event.model_copy(update={"author": "bob"})  # re-signed or not, a signer speaks only for itself
    with pytest.raises(InvalidEvent, match="author 'bob' is not its signer 'alice'"):
        claims.model_copy(update={"signature": claims._mac(SIGNERS["alice"])}).check_signature(None, SIGNERS)


def test_a_named_signer_cannot_approve_its_own_release_nor_approve_as_another():
    serving = _step(ModelState("chat"), _event(1), Governance())
    one = Governance(approval=ApprovalRule(modes=["swap"]))
    state = _step(serving, _event(2).signed(SIGNERS["alice"], "alice"), one)
    assert state.roles.pending is not None and state.roles.pending.author == "alice"
    own = _event(2, ReleaseMode.APPROVE).signed(SIGNERS["alice"], "alice")
    own.check_signature(None, SIGNERS)
    with pytest.raises(InvalidEvent, match="may not approve it"):
        transition(state, own, one, NOW)
    approved = _step(state, _event(2, ReleaseMode.APPROVE).signed(SIGNERS["bob"], "bob"), one)
    assert approved.roles.primary == 2


def test_events_signed_before_signers_existed_still_verify():
    event = _event(2)
    old_form = event.model_dump(mode="json", exclude={"signature", "signer", "provenance"})
    signature = hmac.new(b"shared-key", json.dumps(old_form, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    event.model_copy(update={"signature": signature}).check_signature(b"shared-key", SIGNERS)
