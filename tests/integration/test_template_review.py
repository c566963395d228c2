"""Eval's policy on a scenario's shadow template version, against a real redis-server: too few pairs
decide nothing; enough good pairs promote it and enough bad ones drop it, each decided once however
many eval replicas review at once, with a signed prompt release and an audit entry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from llmesh.common.audit import AuditAction, AuditTrail
from llmesh.common.prompts import PromptRelease, PromptTemplate, ScenarioMode, ScenarioStore
from llmesh.common.registry import connect
from services.eval.pairs import CandidateScores, template_key
from services.eval.policy import PromotionPolicy
from services.eval.templates import TemplateReview

pytestmark = pytest.mark.slow


def _release(version: int, mode: ScenarioMode = ScenarioMode.RELEASE) -> PromptRelease:
    template = PromptTemplate(text=f"v{version}: {{{{ q }}}}", params={"q": {}})  # type: ignore[dict-item]
    return PromptRelease(scenario="s", version=version, mode=mode, template=template, model="chat", share_percent=100)


def _score(rouge_l: float) -> dict[str, object]:
    return {
        "at": time.time(),
        "exact_match": 0.0,
        "token_agreement": rouge_l,
        "rouge_l": rouge_l,
        "embedding_cosine": rouge_l,
        "latency_delta_ms": 0.0,
        "length_ratio": 1.0,
        "sensitive_hits": 0,
        "candidate_error": False,
    }


@pytest.fixture
async def parts(redis_port: int) -> AsyncIterator[tuple[ScenarioStore, CandidateScores, AuditTrail]]:
    client = connect(f"redis://127.0.0.1:{redis_port}/0")
    await client.flushdb()
    store = ScenarioStore(client)
    await store.apply(_release(1), 0)
    await store.apply(_release(2, ScenarioMode.SHADOW), 1)
    yield store, CandidateScores(client), AuditTrail(client)
    await client.aclose()


@pytest.mark.parametrize(("rouge_l", "expected"), [(0.9, ScenarioMode.PROMOTE), (0.1, ScenarioMode.ROLLBACK)])
async def test_enough_pairs_decide_once_across_replicas(parts, rouge_l: float, expected: ScenarioMode):
    store, scores, audit = parts
    published: list[PromptRelease] = []

    async def publish(event: PromptRelease) -> None:
        published.append(event)

    policy = PromotionPolicy(min_samples=5)
    replicas = [TemplateReview(store, scores, policy, audit, publish) for _ in range(3)]
    for _ in range(4):
        await scores.add(template_key("s"), 2, _score(rouge_l))
    await asyncio.gather(*(r.review() for r in replicas))
    assert published == [], "too few pairs"
    (stats,) = await replicas[0].candidates()
    assert (stats.scenario, stats.model, stats.candidate_version, stats.pairs) == ("s", "chat", 2, 4)

    await scores.add(template_key("s"), 2, _score(rouge_l))
    await asyncio.gather(*(r.review() for r in replicas))
    assert [(e.scenario, e.version, e.mode) for e in published] == [("s", 2, expected)]
    assert published[0].reason.startswith(f"policy {'promote' if expected is ScenarioMode.PROMOTE else 'reject'}")
    entries = [e for e in await audit.entries() if e.action is AuditAction.POLICY_DECISION]
    assert [(e.model, e.version, e.event_id) for e in entries] == [(template_key("s"), 2, published[0].event_id)]
