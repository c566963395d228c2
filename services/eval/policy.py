"""The promotion policy: when a candidate has earned promotion, or must go."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmesh.common.approval import ApprovalRule
from llmesh.v1 import eval_pb2


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact_match_min: float = Field(default=0.0, ge=0, le=1)
    token_agreement_min: float = Field(default=0.0, ge=0, le=1)
    rouge_l_min: float = Field(default=0.3, ge=0, le=1)
    embedding_cosine_min: float = Field(default=0.5, ge=-1, le=1)
    latency_delta_ms_max: float = 1e9
    length_ratio_min: float = 0.0
    length_ratio_max: float = 1e9
    sensitive_hits_max: int = 0


class PromotionPolicy(BaseModel):
    """Declarative: loaded from YAML (LLMESH_POLICY_FILE) or these defaults."""

    model_config = ConfigDict(extra="forbid")

    min_samples: int = Field(default=20, ge=1)
    window_s: float = Field(default=300.0, gt=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    thresholds: Thresholds = Thresholds()
    on_pass: str = Field(default="promote", pattern="^(promote|hold)$")
    on_fail: str = Field(default="reject", pattern="^(reject|hold)$")  # reject a shadow, roll back a canary
    approval: ApprovalRule = Field(default_factory=ApprovalRule, description="infer applies it (llmesh.common.approval)")
    require_provenance: bool = False  # infer applies it
    models: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-model overrides of the fields above")

    @classmethod
    def load(cls, path: Path | None) -> PromotionPolicy:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {}) if path else cls()

    def for_model(self, model: str) -> PromotionPolicy:
        override = self.models.get(model)
        return self.model_validate(self.model_dump(exclude={"models"}) | override) if override else self


@dataclass(frozen=True)
class Verdict:
    action: str  # promote, reject (shadow) or rollback (canary)
    reasons: list[str] = field(default_factory=list)


def judge(policy: PromotionPolicy, stats: eval_pb2.CandidateStats) -> Verdict | None:
    """None while there are too few samples (or the policy holds); else what to do and why."""
    if stats.pairs < policy.min_samples:
        return None
    t = policy.thresholds
    checks = [
        (stats.error_rate <= policy.max_error_rate, f"error rate {stats.error_rate:.3f} > {policy.max_error_rate}"),
        (stats.exact_match >= t.exact_match_min, f"exact match {stats.exact_match:.3f} < {t.exact_match_min}"),
        (
            stats.token_agreement >= t.token_agreement_min,
            f"token agreement {stats.token_agreement:.3f} < {t.token_agreement_min}",
        ),
        (stats.rouge_l >= t.rouge_l_min, f"ROUGE-L {stats.rouge_l:.3f} < {t.rouge_l_min}"),
        (
            stats.embedding_cosine >= t.embedding_cosine_min,
            f"embedding cosine {stats.embedding_cosine:.3f} < {t.embedding_cosine_min}",
        ),
        (
            stats.latency_delta_ms <= t.latency_delta_ms_max,
            f"latency delta {stats.latency_delta_ms:.1f} ms > {t.latency_delta_ms_max}",
        ),
        (
            t.length_ratio_min <= stats.length_ratio <= t.length_ratio_max,
            f"length ratio {stats.length_ratio:.2f} outside [{t.length_ratio_min}, {t.length_ratio_max}]",
        ),
        (stats.sensitive_hits <= t.sensitive_hits_max, f"{stats.sensitive_hits} sensitive-word hits > {t.sensitive_hits_max}"),
    ]
    failures = [reason for ok, reason in checks if not ok]
    if failures:
        if policy.on_fail == "hold":
            return None
        return Verdict("rollback" if stats.mode == "canary" else "reject", failures)
    if policy.on_pass == "hold":
        return None
    return Verdict(
        "promote",
        [f"{stats.pairs} pairs within every threshold (ROUGE-L {stats.rouge_l:.3f}, cosine {stats.embedding_cosine:.3f})"],
    )
