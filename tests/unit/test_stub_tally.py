"""The infer service's metrics from the model's stubs inside Triton (services/infer/stubtally.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.infer.repository import parse_triton_name, triton_name
from services.infer.stubtally import StubTallyCollector

GONE = 99_999_999  # above any pid_max: no such process


def _write(folder: Path, name: str, *fields: int) -> None:
    (folder / name).write_bytes(struct.pack(f"{len(fields)}q", *fields))


def _registry(folder: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StubTallyCollector(folder))
    return registry


def test_counters_add_every_stub_and_gauges_only_the_live_ones(tmp_path: Path) -> None:
    me = os.getpid()
    _write(tmp_path, f"chat-v1.{me}", 100, 2, 5, 3)
    _write(tmp_path, f"chat-v1.{GONE}", 40, 1, 7, 9)  # a stub that ended: its gauges are stale
    _write(tmp_path, f"chat-v2.{me}", 8, 0, 0, 1)
    _write(tmp_path, str(GONE), 1000, 1000)  # the file of an older model.py: no model in its name
    _write(tmp_path, f"chat-v3.{me}", 1)  # being created: too short
    (tmp_path / "notes.txt").write_text("not a stub's")
    registry = _registry(tmp_path)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("llmesh_triton_generated_tokens_total", model="chat", version="1") == 140
    assert value("llmesh_triton_cancelled_total", model="chat", version="1") == 3
    assert value("llmesh_infer_sequences", model="chat", version="1", state="queued") == 5
    assert value("llmesh_infer_sequences", model="chat", version="1", state="running") == 3
    assert value("llmesh_infer_sequences", model="chat", version="2", state="running") == 1
    assert value("llmesh_triton_generated_tokens_total", model="chat", version="3") is None


def test_an_empty_or_missing_folder_exports_nothing(tmp_path: Path) -> None:
    assert [m.samples for m in _registry(tmp_path / "absent").collect()] == [[], [], []]


def test_triton_names_parse_back() -> None:
    assert parse_triton_name(triton_name("chat-v-next", 12)) == ("chat-v-next", 12)
    assert parse_triton_name("chat") is None
    assert parse_triton_name("-v1") is None
    assert parse_triton_name("chat-vx") is None
