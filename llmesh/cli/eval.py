"""`llmesh eval report` and `llmesh eval backtest`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from llmesh import backtest, client
from llmesh.cli import report
from llmesh.cli.audit import since_time
from llmesh.stack.layout import StackLayout
from llmesh.v1 import eval_pb2, eval_pb2_grpc

app = typer.Typer(help="Evaluation: reports and batch backtests.", no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
HomeOpt = Annotated[Path, typer.Option(envvar="LLMESH_HOME", help="the embedded stack's folder")]
VERSION_COLUMNS = (
    "model",
    "version",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_mean",
    "latency_ms_max",
)
CANDIDATE_COLUMNS = (
    "model",
    "candidate_version",
    "mode",
    "pairs",
    "missing",
    "late",
    *report.CANDIDATE_METRICS,
    "latency_delta_ms",
    "sensitive_hits",
)
USAGE_COLUMNS = ("api_key_id", "scenario", "requests", "prompt_tokens", "completion_tokens")
# The terminal's layout (the JSON and HTML keep every field under its own name): one table per
# concern, headers whole in 80 columns, candidates one per column.
TRAFFIC_TABLE = (
    ("model", "version", "requests", "errors", "latency_ms_mean", "latency_ms_max"),
    ("model", "version", "requests", "errors", "mean ms", "max ms"),
)
TOKENS_TABLE = (
    ("model", "version", "prompt_tokens", "completion_tokens"),
    ("model", "version", "prompt tokens", "completion tokens"),
)
USAGE_TABLE = (USAGE_COLUMNS, ("API key", "scenario", "requests", "prompt tokens", "completion tokens"))
FEEDBACK_COLUMNS = ("model", "version", "scenario", "template_version", "ratings", "rating_mean", "labels")
FEEDBACK_TABLE = (
    ("model", "version", "scenario", "ratings", "rating_mean", "labels"),
    ("model", "version", "scenario", "ratings", "mean rating", "labels"),
)
SCENARIO_COLUMNS = (
    "scenario",
    "template_version",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_mean",
)
SCENARIO_TABLE = (
    ("scenario", "template_version", "requests", "prompt_tokens", "completion_tokens"),
    ("scenario", "template", "requests", "prompt tokens", "completion tokens"),
)
BACKTEST_COLUMNS = (
    "version",
    "cases",
    "errors",
    "exact_match",
    "rouge_l",
    "embedding_cosine",
    "labelled",
    "precision",
    "recall",
    "f1",
    "asserted",
    "pass_rate",
)


def _address(home: Path, service: str, given: str | None) -> str:
    if given:
        return given
    layout = StackLayout.load(home.resolve())
    if layout is None:
        raise typer.BadParameter(f"no stack in {home}: run llmesh up, or pass the address")
    return layout.address(service)


def _rows(messages: Any) -> list[dict[str, Any]]:
    return [MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True) for m in messages]


@app.command("report")
def eval_report(
    model: str = "",
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="also write an HTML report with plots")] = None,  # noqa: UP045
    eval_address: Annotated[Optional[str], typer.Option("--eval", help="eval host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Per-version aggregates, candidates against their primary, and token usage per API key."""
    with client.channel(_address(home, "eval", eval_address)) as channel:  # LLMESH_API_KEY: a read or admin key
        try:
            result = eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(model=model), timeout=10)
        except grpc.RpcError as err:
            console.print(f"[red]{err.code().name}[/]: {err.details()}")
            raise typer.Exit(1) from err
    versions, candidates, usage = _rows(result.versions), _rows(result.candidates), _rows(result.usage)
    feedback, scenarios = _rows(result.feedback), _rows(result.scenarios)
    if json_out:
        data = {"versions": versions, "candidates": candidates, "usage": usage, "feedback": feedback, "scenarios": scenarios}
        console.print_json(data=data)
    else:
        for part in report_tables(versions, candidates, usage, feedback, scenarios):
            console.print(part)
    if html_out:
        charts = [
            (
                "candidate scores",
                [_candidate(c) for c in candidates],
                {m: [float(c[m]) for c in candidates] for m in report.CANDIDATE_METRICS[:4]},
            ),
            (
                "mean latency (ms)",
                [f"{v['model']} v{v['version']}" for v in versions],
                {"latency": [float(v["latency_ms_mean"]) for v in versions]},
            ),
        ]
        sections = [
            ("Versions", versions, VERSION_COLUMNS),
            ("Candidates vs primary", candidates, CANDIDATE_COLUMNS),
            ("Token usage", usage, USAGE_COLUMNS),
            ("Feedback", feedback, FEEDBACK_COLUMNS),
            ("Scenarios by template version", scenarios, SCENARIO_COLUMNS),
        ]
        html_out.write_text(report.html_page("llmesh eval report", sections, charts))
        console.print(f"wrote {html_out}")


def report_tables(
    versions: list[dict[str, Any]],
    candidates: list[dict[str, Any]],
    usage: list[dict[str, Any]],
    feedback: Sequence[dict[str, Any]] = (),
    scenarios: Sequence[dict[str, Any]] = (),
) -> list[Table]:
    """The report for a terminal: one table per concern, each whole in 80 columns."""
    rated = [
        row
        | {"labels": ", ".join(f"{k} {v}" for k, v in sorted(row.get("labels", {}).items()))}
        | ({"scenario": f"{row['scenario']} (template v{row['template_version']})"} if row.get("template_version") else {})
        for row in feedback
    ]
    return [
        report.table("versions: traffic", versions, *TRAFFIC_TABLE),
        report.table("versions: tokens", versions, *TOKENS_TABLE),
        *report.vertical("candidates vs primary", candidates, _candidate, CANDIDATE_COLUMNS[2:]),
        report.table("token usage by key and scenario", usage, *USAGE_TABLE),
        report.table("feedback by version and scenario", rated, *FEEDBACK_TABLE),
        report.table("released scenarios by template version", list(scenarios), *SCENARIO_TABLE),
    ]


def _version(row: dict[str, Any]) -> str:
    return f"v{row['version']}"


def _candidate(row: dict[str, Any]) -> str:
    if row.get("scenario"):  # a scenario's shadow template version
        return f"{row['scenario']} template v{row['candidate_version']}"
    return f"{row['model']} v{row['candidate_version']}"


@app.command("export")
def eval_export(
    out: Annotated[Path, typer.Option(help="the JSONL file to write")],
    since: Annotated[str, typer.Option(help="rated since: a duration back (30m, 2h, 7d) or an ISO 8601 time")] = "",
    min_rating: Annotated[int, typer.Option(min=0, max=5, help="only answers rated at least this (1-5)")] = 0,
    model: str = "",
    eval_address: Annotated[Optional[str], typer.Option("--eval", help="eval host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Write rated answers with their prompts as a fine-tuning set (JSONL: prompt, answer, rating,
    label, comment, model, version, scenario, template_version). Needs LLMESH_RECORD_TEXTS on the gateways."""
    try:
        start = since_time(since, time.time()) if since else 0.0
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--since") from err
    request = eval_pb2.ExportRequest(since=start, min_rating=min_rating, model=model)
    written = 0
    with client.channel(_address(home, "eval", eval_address)) as channel, out.open("w") as sink:
        try:
            for example in eval_pb2_grpc.EvalStub(channel).ExportExamples(request, timeout=300):
                sink.write(json.dumps(MessageToDict(example, preserving_proto_field_name=True)) + "\n")
                written += 1
        except grpc.RpcError as err:
            console.print(f"[red]{err.code().name}[/]: {escape(err.details() or '')}")
            raise typer.Exit(1) from err
    console.print(f"wrote {written} rated examples to {out}")


@app.command("backtest")
def eval_backtest(
    version: Annotated[int, typer.Option(help="the model's version, or with --scenario the template version")],
    cases: Annotated[Path, typer.Option(help="JSONL: id, prompt (or variables), expected, optional label and max_tokens")],
    model: Annotated[str, typer.Option(help="the model whose version is tested")] = "",
    scenario: Annotated[str, typer.Option(help="or: the scenario whose template version is tested")] = "",
    against: Annotated[Optional[int], typer.Option(help="another version to compare side by side")] = None,  # noqa: UP045
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 4,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write every case's result as JSON")] = None,  # noqa: UP045
    html_out: Annotated[Optional[Path], typer.Option("--html", help="write an HTML report with plots")] = None,  # noqa: UP045
    fail_under: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--fail-under",
            help="METRIC=VALUE (repeatable): exit 1 when --version scores below it; metrics: "
            + ", ".join(backtest.GATED_METRICS),
        ),
    ] = None,
    gateway: Annotated[Optional[str], typer.Option(help="gateway host:port (default: the local stack)")] = None,  # noqa: UP045
    home: HomeOpt = Path(".llmesh"),
) -> None:
    """Send a case file through the mesh against one version (or two) and score every answer; with
    --fail-under, a gate for a pipeline (exit 1 when a threshold fails, 2 on bad input)."""
    targets = [backtest.Target(v, model, scenario) for v in ([version] if against is None else [version, against])]
    try:
        if bool(model) == bool(scenario):
            raise ValueError("name the --model or the --scenario to test")
        thresholds = dict(backtest.parse_threshold(t) for t in fail_under or [])
        loaded = backtest.load_cases(cases)
        targets[0].check(loaded)
    except (OSError, ValueError) as err:
        console.print(f"[red]{escape(str(err))}[/]")
        raise typer.Exit(2) from err
    address = _address(home, "gateway", gateway)
    results: dict[int, list[backtest.CaseResult]] = {}
    with Progress(console=console) as progress:
        for target in targets:
            bar = progress.add_task(str(target), total=len(loaded))
            advance = partial(progress.advance, bar)
            results[target.version] = backtest.run(address, target, loaded, concurrency=concurrency, progress=advance)
    summaries = [backtest.summary(r) for r in results.values()]
    for part in report.vertical(f"backtest of {cases.name} ({len(loaded)} cases)", summaries, _version, BACKTEST_COLUMNS[1:]):
        console.print(part)
    if json_out:
        json_out.write_text(backtest.to_json(results))
        console.print(f"wrote {json_out}")
    if html_out:
        metrics = ("exact_match", "rouge_l", "embedding_cosine", "precision", "recall", "f1")
        chart = ("backtest", list(metrics), {f"v{s['version']}": [float(s[m]) for m in metrics] for s in summaries})
        html_out.write_text(
            report.html_page(f"llmesh backtest: {model or scenario}", [("Summary", summaries, BACKTEST_COLUMNS)], [chart])
        )
        console.print(f"wrote {html_out}")
    if thresholds:
        failures = backtest.gate(summaries[0], thresholds)
        for failure in failures:
            console.print(f"[red]FAIL[/] {targets[0]}: {failure}")
        if failures:
            raise typer.Exit(1)
        console.print(f"PASS {targets[0]}: " + ", ".join(f"{n} >= {v}" for n, v in thresholds.items()))
