"""Which version answers a request, and whether it is mirrored to a shadow candidate."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from llmesh.common.prompts import ScenarioMode, ScenarioState, TemplateVersion
from llmesh.common.registry import Route, Routing


def bucket(key: str) -> int:
    """A stable bucket in [0, 100) for `key`: the same key always lands in the same bucket."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") % 100


@dataclass(frozen=True)
class TrafficPlan:
    answer: Route  # the version whose answer the client gets
    shadow: Route | None = None  # a candidate that gets a mirrored copy (its answer goes to eval only)


def plan(model: str, routing: Routing, sticky_key: str, request_id: str) -> TrafficPlan:
    """Canary: a share of sticky keys (API key, or the request's hash) is answered by the candidate,
    and the primary gets a mirrored copy so that eval can compare the two answers.
    Shadow: a share of requests is mirrored to the candidate; the primary answers."""
    primary = Route(model, routing.primary)
    if not routing.candidate:
        return TrafficPlan(primary)
    candidate = Route(model, routing.candidate)
    if routing.candidate_mode == "canary":
        if bucket(sticky_key) < routing.candidate_share:
            return TrafficPlan(candidate, shadow=primary)
        return TrafficPlan(primary)
    if routing.candidate_mode == "shadow" and bucket(request_id) < routing.candidate_share:
        return TrafficPlan(primary, shadow=candidate)
    return TrafficPlan(primary)


@dataclass(frozen=True)
class TemplatePlan:
    answer: TemplateVersion  # the template version whose prompt the model answers for the client
    shadow: TemplateVersion | None = None  # a candidate whose prompt is mirrored (its answer goes to eval only)


def plan_template(state: ScenarioState, sticky_key: str, request_id: str) -> TemplatePlan:
    """A scenario's canary answers its share of sticky keys (bucketed apart from the model's canary);
    its shadow gets its share of requests mirrored."""
    primary = state.serving()
    if not state.candidate:
        return TemplatePlan(primary)
    candidate = state.versions[state.candidate]
    if state.candidate_mode is ScenarioMode.SHADOW:
        return TemplatePlan(primary, candidate if bucket(request_id) < state.share_percent else None)
    return TemplatePlan(candidate if bucket(f"{state.name}\0{sticky_key}") < state.share_percent else primary)
