import uuid

import pytest

from llmesh.common.registry import Route, Routing
from services.gateway.traffic import bucket, plan


@pytest.mark.parametrize("share", [0, 10, 30, 50, 100])
def test_canary_share_is_honoured_over_1000_keys(share):
    routing = Routing(primary=1, candidate=2, candidate_mode="canary", candidate_share=share)
    served = [plan("chat", routing, f"key-{i}", uuid.uuid4().hex).answer.version for i in range(1000)]
    observed = served.count(2) / 10
    assert abs(observed - share) <= 4.5, f"{observed}% of 1000 keys on the candidate for a {share}% canary"  # ~3 sigma


def test_canary_is_sticky_per_key():
    routing = Routing(primary=1, candidate=2, candidate_mode="canary", candidate_share=30)
    for i in range(200):
        versions = {plan("chat", routing, f"key-{i}", uuid.uuid4().hex).answer.version for _ in range(5)}
        assert len(versions) == 1


def test_shadow_never_answers_and_mirrors_its_share():
    routing = Routing(primary=1, candidate=2, candidate_mode="shadow", candidate_share=25)
    plans = [plan("chat", routing, "key", uuid.uuid4().hex) for _ in range(2000)]
    assert all(p.answer == Route("chat", 1) for p in plans)
    mirrored = sum(p.shadow == Route("chat", 2) for p in plans) / 20
    assert abs(mirrored - 25) <= 3.5


def test_no_candidate_means_primary_only():
    assert plan("chat", Routing(primary=3), "k", "r").answer == Route("chat", 3)
    assert plan("chat", Routing(primary=3), "k", "r").shadow is None


def test_buckets_are_stable_and_spread():
    assert bucket("same") == bucket("same")
    assert len({bucket(str(i)) for i in range(1000)}) == 100
