"""Batch backtests: a JSONL file of cases sent through the mesh against chosen versions, and scored.

A case: {"id": "...", "prompt": "...", "expected": "...", "label": 0|1 (optional), "max_tokens": N (optional),
"assert": [{"type": "contains", "value": "..."}, ...] (optional)}; against a scenario's template version,
"variables": {...} instead of the prompt (the template renders it).
For labelled cases the prediction is positive when the answer matches the expected text
(ROUGE-L >= match_threshold), which gives precision, recall and F1. Assertions, as promptfoo writes
them (`contains`, `icontains`, `equals`, `regex`, `is-json`, each also as `not-...`), give a pass rate
over the cases that carry any. `gate` compares a summary with thresholds (`--fail-under`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from llmesh import client
from llmesh.common.scoring import Embedder, rouge_l, words
from llmesh.common.validation import summarize
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

ASSERTION_TYPES = ("contains", "icontains", "equals", "regex", "is-json")


class Assertion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    value: str = ""

    @field_validator("type")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind.removeprefix("not-") not in ASSERTION_TYPES:
            raise ValueError(f"unknown assertion {kind!r}; one of {', '.join(ASSERTION_TYPES)}, each also as not-...")
        return kind

    @model_validator(mode="after")
    def _compiles(self) -> Assertion:
        if self.type.removeprefix("not-") == "regex":
            try:
                re.compile(self.value)
            except re.error as err:
                raise ValueError(f"regex {self.value!r}: {err}") from None
        return self

    def holds(self, answer: str) -> bool:
        kind = self.type.removeprefix("not-")
        if kind == "contains":
            found = self.value in answer
        elif kind == "icontains":
            found = self.value.lower() in answer.lower()
        elif kind == "equals":
            found = answer.strip() == self.value.strip()
        elif kind == "regex":
            found = re.search(self.value, answer) is not None
        else:
            found = _is_json(answer)
        return found != self.type.startswith("not-")

    def __str__(self) -> str:
        return f"{self.type} {self.value!r}" if self.value else self.type


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Case(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    prompt: str = ""
    variables: dict[str, StrictStr | StrictBool | StrictInt | float] | None = None  # for a scenario's template
    expected: str = ""
    label: int | None = Field(default=None, ge=0, le=1)
    max_tokens: int = Field(default=24, ge=1)
    assertions: list[Assertion] = Field(default_factory=list, alias="assert")


@dataclass(frozen=True)
class Target:
    """What a backtest asks: a model version, or a scenario's template version (pinned: NAME@N)."""

    version: int
    model: str = ""
    scenario: str = ""

    def __str__(self) -> str:
        return f"{self.scenario} template v{self.version}" if self.scenario else f"{self.model}@{self.version}"

    def request(self, case: Case, sampling: common_pb2.SamplingParams) -> gateway_pb2.GenerateRequest:
        if not self.scenario:
            return gateway_pb2.GenerateRequest(model=f"{self.model}@{self.version}", prompt=case.prompt, sampling=sampling)
        request = gateway_pb2.GenerateRequest(scenario=f"{self.scenario}@{self.version}", sampling=sampling)
        request.variables.update(case.variables or {})
        return request

    def check(self, cases: list[Case]) -> None:
        """ValueError naming the first case that does not fit: a prompt for a model, variables for a scenario."""
        for case in cases:
            if self.scenario and case.variables is None:
                raise ValueError(f"case {case.id}: a scenario's template renders the prompt: give variables")
            if not self.scenario and not case.prompt:
                raise ValueError(f"case {case.id}: no prompt")


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
    failed: list[str]  # the assertions the answer did not satisfy
    asserted: bool  # the case carries assertions


def load_cases(path: Path) -> list[Case]:
    """The cases of a JSONL file; ValueError naming the first bad line."""
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                cases.append(Case.model_validate_json(line))
            except ValidationError as err:
                raise ValueError(f"{path.name} line {number}: {summarize(err, 3)}") from None
    return cases


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
        [str(a) for a in case.assertions if error or not a.holds(answer)],
        bool(case.assertions),
    )


def run(
    address: str,
    target: Target,
    cases: list[Case],
    *,
    concurrency: int = 4,
    seed: int = 0,
    threshold: float = 0.5,
    progress: Callable[[], None] | None = None,
) -> list[CaseResult]:
    """Send every case to `target` (greedy unless a seed is wanted), at most `concurrency` at once."""
    embedder = Embedder()
    local = threading.local()

    def one(case: Case) -> CaseResult:
        if not hasattr(local, "stub"):
            local.stub = gateway_pb2_grpc.GatewayStub(client.gateway_channel(address))
        sampling = common_pb2.SamplingParams(max_tokens=case.max_tokens, temperature=0.0 if not seed else 0.8, seed=seed)
        request = target.request(case, sampling)
        try:
            answer, error = local.stub.Generate(request, timeout=60).text, ""
        except grpc.RpcError as err:
            answer, error = "", f"{err.code().name}: {err.details()}"
        result = _score(case, target.version, answer, error, embedder, threshold)
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
    asserted = [r for r in results if r.asserted]
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
        "asserted": len(asserted),
        "pass_rate": sum(not r.failed for r in asserted) / len(asserted) if asserted else 0.0,
    }


GATED_METRICS = ("exact_match", "rouge_l", "embedding_cosine", "precision", "recall", "f1", "pass_rate")


def parse_threshold(text: str) -> tuple[str, float]:
    """`rouge_l=0.3` -> ("rouge_l", 0.3); ValueError saying what is wrong."""
    name, sep, value = text.partition("=")
    if not sep or name not in GATED_METRICS:
        raise ValueError(f"{text!r}: write METRIC=VALUE with METRIC one of {', '.join(GATED_METRICS)}")
    try:
        return name, float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number") from None


def gate(summary: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """The thresholds a summary falls short of, each said in words ([] when it passes)."""
    return [
        f"{name} {float(summary[name]):.3f} < {minimum}" for name, minimum in thresholds.items() if float(summary[name]) < minimum
    ]


def to_json(results: dict[int, list[CaseResult]]) -> str:
    return json.dumps(
        {"summary": [summary(r) for r in results.values()], "cases": {v: [asdict(c) for c in r] for v, r in results.items()}},
        indent=2,
    )
