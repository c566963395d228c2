"""The promotion policy for a scenario's shadow template version. Its pairs (the same model version
answering the primary template's prompt and the shadow's, scored under `scenario/{name}`) are judged by
the thresholds that judge a model's candidate; the first eval replica to set the guard publishes a
signed prompt release that promotes the version or drops it, and records the decision."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from llmesh.common.audit import AuditAction, AuditEntry, AuditSource, AuditTrail
from llmesh.common.prompts import PromptRelease, ScenarioMode, ScenarioState, ScenarioStore
from llmesh.v1 import eval_pb2
from services.eval.pairs import CandidateScores, template_key
from services.eval.policy import PromotionPolicy, Verdict, judge

log = logging.getLogger("llmesh.eval.templates")
AUTHOR = "llmesh-eval policy"


class TemplateReview:
    def __init__(
        self,
        scenarios: ScenarioStore,
        scores: CandidateScores,
        policy: PromotionPolicy,
        audit: AuditTrail,
        publish: Callable[[PromptRelease], Awaitable[None]],
    ) -> None:
        self.scenarios, self.scores, self.policy, self.audit, self.publish = scenarios, scores, policy, audit, publish

    async def candidates(self) -> list[eval_pb2.CandidateStats]:
        """Every scenario's shadow template version, against its primary."""
        found = []
        for name in await self.scenarios.names():
            if (state := await self.scenarios.get(name)) is not None and (stats := await self._stats(state)) is not None:
                found.append(stats)
        return found

    async def review(self) -> None:
        for name in await self.scenarios.names():
            state = await self.scenarios.get(name)
            if state is None or (stats := await self._stats(state)) is None:
                continue
            verdict = judge(self.policy, stats)
            guard = f"llmesh:eval:decided:{template_key(name)}:{state.candidate}"
            if verdict is not None and await self.scenarios.redis.set(guard, verdict.action, nx=True):
                await self._act(state, stats, verdict)

    async def _stats(self, state: ScenarioState) -> eval_pb2.CandidateStats | None:
        if not state.candidate or state.candidate_mode is not ScenarioMode.SHADOW:
            return None
        stats = await self.scores.stats(
            template_key(state.name), state.candidate, ScenarioMode.SHADOW.value, self.policy.window_s
        )
        stats.model, stats.scenario = state.serving().model, state.name
        return stats

    async def _act(self, state: ScenarioState, stats: eval_pb2.CandidateStats, verdict: Verdict) -> None:
        reason = f"policy {verdict.action}: " + "; ".join(verdict.reasons)
        mode = ScenarioMode.PROMOTE if verdict.action == "promote" else ScenarioMode.ROLLBACK
        event = PromptRelease(scenario=state.name, version=state.candidate, mode=mode, author=AUTHOR, reason=reason)
        await self.publish(event)
        figures = {f: f"{getattr(stats, f):.4g}" for f in ("rouge_l", "embedding_cosine", "exact_match", "error_rate")}
        await self.audit.append(
            AuditEntry(
                id=f"{AuditAction.POLICY_DECISION}:{event.event_id}",
                action=AuditAction.POLICY_DECISION,
                source=AuditSource.EVAL_POLICY,
                actor=AUTHOR,
                model=template_key(state.name),
                version=state.candidate,
                reason=reason,
                event_id=event.event_id,
                details={"action": verdict.action, "mode": "shadow", "samples": str(stats.pairs)} | figures,
            )
        )
        log.info("template policy decision", extra={"scenario": state.name, "version": state.candidate, "action": mode.value})
