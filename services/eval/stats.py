"""Running aggregates of finished generations per model version."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from llmesh.v1 import eval_pb2, events_pb2


@dataclass
class VersionAggregate:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0

    def add(self, record: events_pb2.GenerationRecord) -> None:
        self.requests += 1
        self.errors += record.status_code != 0
        self.prompt_tokens += record.usage.prompt_tokens
        self.completion_tokens += record.usage.completion_tokens
        self.latency_ms_sum += record.latency_ms
        self.latency_ms_max = max(self.latency_ms_max, record.latency_ms)


@dataclass
class FeedbackAggregate:
    ratings: int = 0
    rating_sum: int = 0
    labels: Counter[str] = field(default_factory=Counter)

    def add(self, rating: int, label: str, sign: int = 1) -> None:
        self.ratings += sign
        self.rating_sum += sign * rating
        if label:
            self.labels[label] += sign


class GenerationStats:
    """Per model version, token usage per API key and scenario, and per released scenario's template version."""

    def __init__(self, remember: int = 100_000) -> None:
        self._by_version: dict[tuple[str, int], VersionAggregate] = {}
        self._usage: dict[tuple[str, str], VersionAggregate] = {}
        self._scenarios: dict[tuple[str, int], VersionAggregate] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()  # the latest request ids: a replayed record counts once
        self._remember = remember
        self._feedback: dict[tuple[str, int, str, int], FeedbackAggregate] = {}
        self._rated: OrderedDict[str, events_pb2.FeedbackEvent] = OrderedDict()  # a request's latest feedback counts

    def add_feedback(self, event: events_pb2.FeedbackEvent) -> None:
        """Count a rating; a later one of the same request replaces it (a replay changes nothing)."""
        if (before := self._rated.pop(event.request_id, None)) is not None:
            self._feedback[_rated(before)].add(before.rating, before.label, -1)
        self._rated[event.request_id] = event
        if len(self._rated) > self._remember:
            self._rated.popitem(last=False)
        self._feedback.setdefault(_rated(event), FeedbackAggregate()).add(event.rating, event.label)

    def add(self, record: events_pb2.GenerationRecord) -> bool:
        """Count a record; False (counting nothing) for a request counted already."""
        if record.request_id in self._seen:
            return False
        self._seen[record.request_id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        self._by_version.setdefault((record.model, record.version), VersionAggregate()).add(record)
        self._usage.setdefault((record.api_key_id, record.scenario), VersionAggregate()).add(record)
        if record.template_version:
            self._scenarios.setdefault((record.scenario, record.template_version), VersionAggregate()).add(record)
        return True

    def report(self, model: str = "", usage_of: str | None = None) -> eval_pb2.EvalReport:
        """Every model's (or `model`'s) aggregates; token usage of every key, or of key `usage_of` only."""
        rows = []
        for (name, version), agg in sorted(self._by_version.items()):
            if model and name != model:
                continue
            rows.append(
                eval_pb2.VersionStats(
                    model=name,
                    version=version,
                    requests=agg.requests,
                    errors=agg.errors,
                    prompt_tokens=agg.prompt_tokens,
                    completion_tokens=agg.completion_tokens,
                    latency_ms_mean=agg.latency_ms_sum / agg.requests,
                    latency_ms_max=agg.latency_ms_max,
                )
            )
        usage = [
            eval_pb2.UsageRow(
                api_key_id=key,
                scenario=scenario,
                requests=agg.requests,
                prompt_tokens=agg.prompt_tokens,
                completion_tokens=agg.completion_tokens,
            )
            for (key, scenario), agg in sorted(self._usage.items())
            if usage_of is None or key == usage_of
        ]
        feedback = [
            eval_pb2.FeedbackRow(
                model=name,
                version=version,
                scenario=scenario,
                template_version=template_version,
                ratings=agg.ratings,
                rating_mean=agg.rating_sum / agg.ratings,
                labels={label: n for label, n in agg.labels.items() if n > 0},
            )
            for (name, version, scenario, template_version), agg in sorted(self._feedback.items())
            if agg.ratings and (not model or name == model)
        ]
        scenarios = [
            eval_pb2.ScenarioRow(
                scenario=scenario,
                template_version=version,
                requests=agg.requests,
                errors=agg.errors,
                prompt_tokens=agg.prompt_tokens,
                completion_tokens=agg.completion_tokens,
                latency_ms_mean=agg.latency_ms_sum / agg.requests,
            )
            for (scenario, version), agg in sorted(self._scenarios.items())
        ]
        return eval_pb2.EvalReport(versions=rows, usage=usage, feedback=feedback, scenarios=scenarios)


def _rated(event: events_pb2.FeedbackEvent) -> tuple[str, int, str, int]:
    """What feedback is counted by: the model version, and the scenario's template version."""
    return event.model, event.version, event.scenario, event.template_version
