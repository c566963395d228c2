"""Running aggregates of finished generations per model version."""

from __future__ import annotations

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

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, int], VersionAggregate] = {}
        self._usage: dict[tuple[str, str], VersionAggregate] = {}

    def add(self, record: events_pb2.GenerationRecord) -> None:
        self._by_version.setdefault((record.model, record.version), VersionAggregate()).add(record)
        self._usage.setdefault((record.api_key_id, record.scenario), VersionAggregate()).add(record)

    def report(self, model: str = "") -> eval_pb2.EvalReport:
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
        ]
        return eval_pb2.EvalReport(versions=rows, usage=usage)
