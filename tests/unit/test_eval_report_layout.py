"""`llmesh eval report` and `eval backtest` read well in an 80-column terminal: every header and
measure name whole (no ellipsis), every value shown."""

from __future__ import annotations

import io

from rich.console import Console

from llmesh.cli.eval import BACKTEST_COLUMNS, CANDIDATE_COLUMNS, report_tables
from llmesh.cli.report import vertical

VERSION = {
    "model": "chat",
    "version": 12,
    "requests": 123456,
    "errors": 12,
    "prompt_tokens": 12345678,
    "completion_tokens": 23456789,
    "latency_ms_mean": 1234.567,
    "latency_ms_max": 98765.432,
}
CANDIDATE = {name: 0.123456 for name in CANDIDATE_COLUMNS} | {
    "model": "summarizer",
    "candidate_version": 12,
    "mode": "canary",
    "pairs": 1234,
}
USAGE = {
    "api_key_id": "k3f9a8b7c6d5",
    "scenario": "support-replies",
    "requests": 1234,
    "prompt_tokens": 1234567,
    "completion_tokens": 7654321,
}

SCENARIO = {
    "scenario": "support-replies",
    "template_version": 12,
    "requests": 1234,
    "errors": 3,
    "prompt_tokens": 1234567,
    "completion_tokens": 7654321,
    "latency_ms_mean": 123.4,
}


def _render(*tables: object) -> str:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    for table in tables:
        console.print(table)
    return out.getvalue()


def test_the_report_fits_80_columns_with_every_name_whole():
    text = _render(*report_tables([VERSION, VERSION | {"version": 13}], [CANDIDATE] * 4, [USAGE], (), [SCENARIO]))
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in (
        *CANDIDATE_COLUMNS[2:],
        "completion tokens",
        "prompt tokens",
        "API key",
        "mean ms",
        "support-replies",
        "template",
    ):
        assert name in text, name
    assert text.count("summarizer v12") == 4, "four candidates, in tables of three side by side"
    assert "23456789" in text and "98765.432" in text


def test_the_backtest_summary_fits_too():
    summaries = [{name: 0.5 for name in BACKTEST_COLUMNS} | {"version": v, "cases": 120} for v in (1, 2)]
    text = _render(
        *vertical("backtest of cases.jsonl (120 cases)", summaries, lambda r: f"v{r['version']}", BACKTEST_COLUMNS[1:])
    )
    assert "…" not in text and all(name in text for name in BACKTEST_COLUMNS[1:])
