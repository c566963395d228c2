"""Running aggregates of finished generations per model version."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

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


class GenerationStats:
    """Per model version, and token usage per API key and scenario."""

    def __init__(self, remember: int = 100_000) -> None:
        self._by_version: dict[tuple[str, int], VersionAggregate] = {}
        self._usage: dict[tuple[str, str], VersionAggregate] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()  # the latest request ids: a replayed record counts once
        self._remember = remember

    def add(self, record: events_pb2.GenerationRecord) -> bool:
        """Count a record; False (counting nothing) for a request counted already."""
        if record.request_id in self._seen:
            return False
        self._seen[record.request_id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        self._by_version.setdefault((record.model, record.version), VersionAggregate()).add(record)
        self._usage.setdefault((record.api_key_id, record.scenario), VersionAggregate()).add(record)
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
        return eval_pb2.EvalReport(versions=rows, usage=usage)
