"""`llmesh models --history`: each version's author and declared lineage."""

from __future__ import annotations

from rich.console import Console

from llmesh.cli.main import _lineage
from llmesh.common.events import Provenance
from llmesh.v1 import gateway_pb2


def test_the_lineage_table_shows_what_each_release_declared() -> None:
    lineage = Provenance(
        base_model="chat@1",
        base_model_digest="ab" * 32,
        training_data_digest="cd" * 32,
        training_code_commit="0123456789abcdef",
        training_run_id="run-[42]",  # rich markup in a value is shown as text
        evaluation={"rouge_l": 0.61},
        tags={"team": "search"},
    )
    info = gateway_pb2.ModelInfo(name="chat")
    info.versions.add(version=1, author="llmesh up")
    info.versions.add(version=2, author="ci", provenance=lineage.to_proto())
    console = Console(width=200, record=True)
    console.print(_lineage(info))
    text = console.export_text()

    row_1, row_2 = (line for line in text.splitlines() if line.lstrip("│ ").startswith(("1 ", "2 ")))
    assert "llmesh up" in row_1 and "not declared" in row_1
    assert "ci" in row_2 and "base chat@1 (abababababab)" in row_2
    for shown in ("data cdcdcdcdcdcd", "code 0123456789ab", "run run-[42]", "rouge_l=0.61", "team=search"):
        assert shown in text
