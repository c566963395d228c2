import pytest

from llmesh.common.scoring import Embedder, rouge_l, score_pair, sensitive_hits, token_agreement, words


def test_rouge_l_matches_hand_computed_values():
    ref, cand = words("the cat sat on the mat"), words("the cat lay on the mat")
    assert rouge_l(ref, cand) == pytest.approx(5 / 6)
    assert rouge_l(ref, ref) == 1.0
    assert rouge_l(ref, words("dogs bark")) == 0.0


def test_token_agreement_is_positional():
    assert token_agreement(words("a b c d"), words("a b x d")) == 0.75
    assert token_agreement(words("a b"), words("a b c d")) == 0.5
    assert token_agreement([], []) == 1.0


def test_sensitive_words_are_counted_case_insensitively():
    assert sensitive_hits("Password: secret! and SECRET again", frozenset({"secret", "password"})) == 3


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_embedding_similarity_ranks_paraphrase_above_unrelated(embedder):
    close = embedder.cosine("Return the number of items in the list", "Count how many items the list has")
    far = embedder.cosine("Return the number of items in the list", "The weather is sunny in Lisbon")
    assert close > far + 0.3


def test_identical_answers_score_perfectly(embedder):
    s = score_pair(
        0,
        "r",
        "Return the value.",
        "Return the value.",
        latency_delta_ms=1.0,
        candidate_error=False,
        embedder=embedder,
        sensitive=frozenset(),
    )
    assert (s.exact_match, s.token_agreement, s.rouge_l, s.embedding_cosine, s.length_ratio) == (1.0, 1.0, 1.0, 1.0, 1.0)
