"""Which candidate a complete pair of answers scores: a scenario's shadow template version (the same
model version answered both prompts), else the model's candidate as routed now."""

from __future__ import annotations

from llmesh.common.registry import Routing
from services.eval.pairs import Side, paired_sides, template_key


def test_a_shadow_template_pair_is_scored_under_its_scenario():
    answer = Side("chat", 1, "primary's", 10.0, False, "support", shadow_template_version=3)
    mirror = Side("chat", 1, "shadow's", 12.0, False)
    assert paired_sides({"answer": answer, "mirror": mirror}, Routing(primary=1)) == (
        (template_key("support"), 3),
        answer,
        mirror,
    )


def test_a_model_candidate_pair_follows_the_routing():
    answer, mirror = Side("chat", 1, "a", 10.0, False, "support"), Side("chat", 2, "b", 11.0, False)
    sides = {"answer": answer, "mirror": mirror}
    assert paired_sides(sides, Routing(primary=1, candidate=2, candidate_mode="shadow")) == (("chat", 2), answer, mirror)
    assert paired_sides(sides, Routing(primary=1, candidate=3, candidate_mode="shadow")) is None, "the candidate changed"
    assert paired_sides(sides, Routing(primary=1)) is None
    assert "/" in template_key("support"), "apart from every model name"
