"""Batch backtests: a JSONL file of cases sent through the mesh against chosen versions, and scored.

A case: {"id": "...", "prompt": "...", "expected": "...", "label": 0|1 (optional), "max_tokens": N (optional)}.
For labelled cases the prediction is positive when the answer matches the expected text
(ROUGE-L >= match_threshold), which gives precision, recall and F1.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, Field

from llmesh import client
from llmesh.common.scoring import Embedder, rouge_l, words
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class Case(BaseModel):
    id: str
    prompt: str = Field(min_length=1)
    expected: str = ""
    label: int | None = Field(default=None, ge=0, le=1)
    max_tokens: int = Field(default=24, ge=1)


@dataclass
class CaseResult:
    id: str
    version: int
    answer: str
    error: str
    exact_match: float
    rouge_l: float
    embedding_cosine: float
    label: int | None
    predicted: int


def load_cases(path: Path) -> list[Case]:
    return [Case.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def _score(case: Case, version: int, answer: str, error: str, embedder: Embedder, threshold: float) -> CaseResult:
    rl = rouge_l(words(case.expected), words(answer)) if case.expected else 0.0
    cosine = embedder.cosine(case.expected, answer) if case.expected and not error else 0.0
    return CaseResult(
        case.id,
        version,
        answer,
        error,
        float(answer.strip() == case.expected.strip()),
        rl,
        cosine,
        case.label,
        int(rl >= threshold),
    )


def run(
    address: str,
    model: str,
    version: int,
    cases: list[Case],
    *,
    concurrency: int = 4,
    seed: int = 0,
    threshold: float = 0.5,
    progress: Callable[[], None] | None = None,
) -> list[CaseResult]:
    """Send every case to `model@version` (greedy unless a seed is wanted), at most `concurrency` at once."""
    embedder = Embedder()
    local = threading.local()

    def one(case: Case) -> CaseResult:
        if not hasattr(local, "stub"):
            local.stub = gateway_pb2_grpc.GatewayStub(client.gateway_channel(address))
        sampling = common_pb2.SamplingParams(max_tokens=case.max_tokens, temperature=0.0 if not seed else 0.8, seed=seed)
        request = gateway_pb2.GenerateRequest(model=f"{model}@{version}", prompt=case.prompt, sampling=sampling)
        try:
            answer, error = local.stub.Generate(request, timeout=60).text, ""
        except grpc.RpcError as err:
            answer, error = "", f"{err.code().name}: {err.details()}"
        result = _score(case, version, answer, error, embedder, threshold)
        if progress:
            progress()
        return result

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, cases))


def summary(results: list[CaseResult]) -> dict[str, Any]:
    n = len(results)
    labelled = [r for r in results if r.label is not None]
    tp = sum(r.label == 1 and r.predicted == 1 for r in labelled)
    fp = sum(r.label == 0 and r.predicted == 1 for r in labelled)
    fn = sum(r.label == 1 and r.predicted == 0 for r in labelled)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "version": results[0].version if results else 0,
        "cases": n,
        "errors": sum(bool(r.error) for r in results),
        "exact_match": sum(r.exact_match for r in results) / n if n else 0.0,
        "rouge_l": sum(r.rouge_l for r in results) / n if n else 0.0,
        "embedding_cosine": sum(r.embedding_cosine for r in results) / n if n else 0.0,
        "labelled": len(labelled),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def to_json(results: dict[int, list[CaseResult]]) -> str:
    return json.dumps(
        {"summary": [summary(r) for r in results.values()], "cases": {v: [asdict(c) for c in r] for v, r in results.items()}},
        indent=2,
    )
