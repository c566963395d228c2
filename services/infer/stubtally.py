"""Metrics from inside Triton: what each stub of the model (services/infer/triton_model/model.py,
Tally) counts in its file `<repository>/.tally/<triton model name>.<pid>`, read at each scrape.

The counters add up every file, of stubs alive or ended (a stub's tokens stay generated); the
gauges (sequences queued and running now) only those of stubs alive."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.infer.repository import parse_triton_name

FIELDS = struct.Struct("qqqq")  # generated, cancelled, queued, running


@dataclass(frozen=True)
class StubTally:
    model: str
    version: int
    alive: bool
    generated: int
    cancelled: int
    queued: int
    running: int


def read_tallies(folder: Path) -> list[StubTally]:
    """Every well-formed stub file in `folder`; others (a stub's file being created, a stranger's) are skipped."""
    tallies = []
    for path in folder.glob("*.*"):
        name, _, pid = path.name.rpartition(".")
        served = parse_triton_name(name)
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed meanwhile
        if served is None or not pid.isdigit() or len(data) < FIELDS.size:
            continue
        generated, cancelled, queued, running = FIELDS.unpack_from(data)
        alive = Path(f"/proc/{pid}").exists()  # as the stubs themselves judge each other (Foreground)
        tallies.append(StubTally(*served, alive, generated, cancelled, queued, running))
    return tallies


class StubTallyCollector(Collector):
    """Exports the stubs' tallies of one Triton repository (`folder`, once the service knows it),
    summed per model version."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Metric]:
        sequences = GaugeMetricFamily(
            "llmesh_infer_sequences",
            "Sequences in the model inside Triton now: queued (waiting for a place in the batch or their prefill) or running",
            labels=["model", "version", "state"],
        )
        generated = CounterMetricFamily(
            "llmesh_triton_generated_tokens", "Tokens the model generated inside Triton", labels=["model", "version"]
        )
        cancelled = CounterMetricFamily(
            "llmesh_triton_cancelled", "Generations the model stopped on a cancel inside Triton", labels=["model", "version"]
        )
        totals: dict[tuple[str, str], list[int]] = {}
        for tally in read_tallies(self.folder) if self.folder else []:
            total = totals.setdefault((tally.model, str(tally.version)), [0, 0, 0, 0])
            total[0] += tally.generated
            total[1] += tally.cancelled
            if tally.alive:
                total[2] += tally.queued
                total[3] += tally.running
        for labels, (tokens, stopped, queued, running) in sorted(totals.items()):
            generated.add_metric(list(labels), tokens)
            cancelled.add_metric(list(labels), stopped)
            sequences.add_metric([*labels, "queued"], queued)
            sequences.add_metric([*labels, "running"], running)
        yield from (sequences, generated, cancelled)
