from pathlib import Path

from llmesh.v1 import eval_pb2
from services.eval.policy import PromotionPolicy, judge


def _stats(**kw) -> eval_pb2.CandidateStats:
    base = dict(
        model="chat",
        candidate_version=2,
        mode="shadow",
        pairs=50,
        exact_match=1.0,
        token_agreement=1.0,
        rouge_l=1.0,
        embedding_cosine=1.0,
        length_ratio=1.0,
    )
    return eval_pb2.CandidateStats(**(base | kw))


def test_too_few_samples_decides_nothing():
    assert judge(PromotionPolicy(min_samples=100), _stats(pairs=99)) is None


def test_a_candidate_within_thresholds_is_promoted():
    verdict = judge(PromotionPolicy(), _stats())
    assert verdict is not None and verdict.action == "promote"


def test_a_bad_shadow_is_rejected_and_a_bad_canary_rolled_back_with_reasons():
    bad = dict(rouge_l=0.1, embedding_cosine=0.2, error_rate=0.2, candidate_errors=10)
    shadow = judge(PromotionPolicy(), _stats(**bad))
    canary = judge(PromotionPolicy(), _stats(mode="canary", **bad))
    assert shadow is not None and shadow.action == "reject"
    assert canary is not None and canary.action == "rollback"
    assert any("ROUGE-L 0.100 < 0.3" in r for r in shadow.reasons)
    assert any("error rate 0.200 > 0.05" in r for r in shadow.reasons)


def test_policy_loads_from_yaml_with_per_model_overrides(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text("min_samples: 5\nthresholds:\n  rouge_l_min: 0.9\nmodels:\n  steady:\n    on_pass: hold\n    on_fail: hold\n")
    policy = PromotionPolicy.load(path)
    assert policy.min_samples == 5 and policy.thresholds.rouge_l_min == 0.9
    assert judge(policy.for_model("steady"), _stats(rouge_l=0.1)) is None
    assert judge(policy.for_model("other"), _stats(rouge_l=0.1)) is not None
