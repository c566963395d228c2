"""Governed releases: which releases of a model wait for whose approval before they are routed, and
whether a new version must declare its lineage.

The policy is declarative, in the promotion policy file (LLMESH_POLICY_FILE): `approval:` and
`require_provenance:` at the top hold for every model, `models.<name>` overrides them. Infer reads it
when it applies a release event. The replica that applies the event writes what it decided into the
desired state (a `PendingApproval`), so every other replica, the gateways and eval act on that
decision, not on their own copy of the policy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmesh.common.events import ReleaseMode
from llmesh.v1 import gateway_pb2

GATED_MODES = (ReleaseMode.SWAP, ReleaseMode.CANARY, ReleaseMode.SHADOW)  # the modes that route a version


class ApprovalRule(BaseModel):
    """Which releases need approval, how many, and for how long they wait (default: none do)."""

    model_config = ConfigDict(extra="forbid")

    modes: list[Literal["swap", "canary", "shadow"]] = Field(default_factory=list)
    canary_share_above: int = Field(default=0, ge=0, le=100, description="a canary at or below this share needs none")
    approvals: int = Field(default=1, ge=1, le=16)
    allow_self: bool = False  # may the release's author approve it
    expires_s: float = Field(default=24 * 3600, gt=0, le=90 * 24 * 3600)

    def needed(self, mode: ReleaseMode, share_percent: int) -> int:
        """How many approvals a release in `mode` at `share_percent` needs (0: none)."""
        if mode.value not in self.modes or (mode is ReleaseMode.CANARY and share_percent <= self.canary_share_above):
            return 0
        return self.approvals


class Governance(BaseModel):
    """The part of the policy file that infer applies; the promotion fields are eval's."""

    model_config = ConfigDict(extra="ignore")

    approval: ApprovalRule = Field(default_factory=ApprovalRule)
    require_provenance: bool = False  # refuse a new version whose release declares no lineage
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Governance:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {}) if path else cls()

    def for_model(self, model: str) -> Governance:
        override = self.models.get(model)
        return self.model_validate(self.model_dump(exclude={"models"}) | override) if override else self


@dataclass(frozen=True)
class PendingApproval:
    """A release that is loaded everywhere and routed to nobody until enough others approve it."""

    version: int
    mode: str  # swap, canary or shadow: the role change approval applies
    share_percent: int
    event_id: str
    author: str
    reason: str
    requested_at: float
    expires_at: float
    needed: int
    allow_self: bool
    approvals: tuple[str, ...] = ()

    def approved_by(self, approver: str) -> PendingApproval:
        return replace(self, approvals=(*self.approvals, approver))

    def refusal(self, approver: str, now: float) -> str:
        """Why `approver` may not approve it now ('' if they may)."""
        if now > self.expires_at:
            return f"the approval window of version {self.version} closed; release it again"
        if not approver:
            return "an approval must name its approver (author)"
        if approver == self.author and not self.allow_self:
            return f"{approver!r} released version {self.version} and may not approve it: the policy needs another approver"
        if approver in self.approvals:
            return f"{approver!r} approved version {self.version} already"
        return ""

    def dumps(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def loads(cls, data: dict[str, Any]) -> PendingApproval:
        return cls(**{**data, "approvals": tuple(data.get("approvals", ()))})

    def to_proto(self) -> gateway_pb2.PendingApproval:
        return gateway_pb2.PendingApproval(
            version=self.version,
            mode=self.mode,
            share_percent=self.share_percent,
            author=self.author,
            approvals=list(self.approvals),
            needed=self.needed,
            requested_at=self.requested_at,
            expires_at=self.expires_at,
            reason=self.reason,
            event_id=self.event_id,
        )
