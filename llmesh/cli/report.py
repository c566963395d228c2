"""Eval reports for people: terminal tables, JSON, and a self-contained HTML page with plots."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from typing import Any

from rich.table import Table

CANDIDATE_METRICS = ("exact_match", "token_agreement", "rouge_l", "embedding_cosine", "error_rate", "length_ratio")
PER_TABLE = 3  # entities side by side in a vertical table: each takes about 15 columns of an 80-column terminal


def table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] = ()) -> Table:
    """Rows as lines; `headers`: the names shown for `columns` (short enough for 80 columns)."""
    out = Table(*(headers or columns), title=title)
    for row in rows:
        out.add_row(*(_cell(row.get(c, "")) for c in columns))
    return out


def vertical(
    title: str, rows: Sequence[dict[str, Any]], label: Callable[[dict[str, Any]], str], fields: Sequence[str]
) -> list[Table]:
    """Each row as a column, each field as a line: tables of at most PER_TABLE rows side by side, so
    that many measures fit a narrow terminal with their names whole."""
    tables = []
    for start in range(0, len(rows), PER_TABLE) or [0]:
        chunk = rows[start : start + PER_TABLE]
        out = Table("", *(label(r) for r in chunk), title=title)
        for name in fields:
            out.add_row(name, *(_cell(r.get(name, "")) for r in chunk))
        tables.append(out)
    return tables


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _bar_png(title: str, labels: list[str], series: dict[str, list[float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width=width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(
    title: str,
    sections: Sequence[tuple[str, Sequence[dict[str, Any]], Sequence[str]]],
    charts: Sequence[tuple[str, list[str], dict[str, list[float]]]],
) -> str:
    """A page of tables (heading, rows, columns) and bar charts (title, labels, series), images inline."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, rows, columns in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + (_html_table(rows, columns) if rows else "<p>none</p>"))
    for chart_title, labels, series in charts:
        if labels:
            parts.append(
                f'<img alt="{html.escape(chart_title)}" src="data:image/png;base64,{_bar_png(chart_title, labels, series)}">'
            )
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
