"""`llmesh bench`: the benchmarks in bench/, run on a stack of their own, with a summary table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
NAMES = ("resources", "stream", "overhead", "swap", "shadow", "scenario", "scale", "batching")  # `all`
LONG = ("soak",)  # by name only
OFFLINE = ("engines",)  # by name only, no stack: engines compared in this process on CPU


def bench(
    names: Annotated[
        list[str],
        typer.Argument(help=f"{', '.join(NAMES + LONG + OFFLINE)} or all (all but {', '.join(LONG + OFFLINE)})"),
    ],
    quick: Annotated[bool, typer.Option(help="a short smoke run (what CI runs)")] = False,
    out: Annotated[Path, typer.Option(help="where JSON and plots go")] = Path("bench/results"),
    models_dir: Annotated[Path, typer.Option(envvar="LLMESH_MODELS_DIR", help="demo models (built if absent)")] = Path(
        ".llmesh/models"
    ),
) -> None:
    """Measure the mesh against direct Triton and the bare broker (`engines`: the Triton model's batching
    against transformers' on CPU, offline); write JSON and PNG plots."""
    chosen = list(NAMES) if "all" in names else names
    unknown = sorted(set(chosen) - set(NAMES + LONG + OFFLINE))
    if unknown:
        raise typer.BadParameter(f"unknown benchmark(s) {unknown}; choose from {', '.join(NAMES + LONG + OFFLINE)} or all")
    from bench import runner  # the repository's bench/ package: heavy imports only when benchmarking

    summary = runner.run(chosen, out.resolve(), quick, models_dir.resolve(), lambda line: console.print(f"[cyan]bench[/] {line}"))
    console.print(table(summary))
    console.print(f"results: {out}{os.sep}")


def table(summary: dict[str, Any]) -> Table:
    """The headline figures next to issue 6's targets."""
    out = Table("figure", "measured", "target")
    overhead = summary.get("overhead")
    if overhead:
        for cell in overhead["cells"]:
            tag = f"{cell['max_tokens']} tok, c={cell['concurrency']}"
            out.add_row(
                f"gateway - direct p50 / p99 ({tag})",
                f"{cell['p50_overhead_ms']:+.1f} / {cell['p99_overhead_ms']:+.1f} ms",
                "≤ 10 / ≤ 25 ms" if cell["concurrency"] == 1 else "",
            )
            out.add_row(
                f"throughput gateway / direct ({tag})",
                f"{cell['throughput_ratio']:.2f}",
                "≥ 0.85 at c=16" if cell["concurrency"] == 16 else "",
            )
            out.add_row(
                f"HTTP - direct p50 / p99; HTTP - gRPC p50 ({tag})",
                f"{cell['http_p50_overhead_ms']:+.1f} / {cell['http_p99_overhead_ms']:+.1f}; {cell['http_minus_grpc_p50_ms']:+.1f} ms",
                "",
            )
            out.add_row(f"throughput HTTP / direct ({tag})", f"{cell['http_throughput_ratio']:.2f}", "")
        rtt = overhead["broker_round_trip"]
        out.add_row("bare broker round trip p50 / p99", f"{rtt['p50_ms']:.2f} / {rtt['p99_ms']:.2f} ms", "")
        out.add_row(
            "mesh cost per hop beyond the bare broker", f"{overhead['mesh_cost_per_hop_beyond_broker_ms']:+.2f} ms", "< 1 ms"
        )
    stream = summary.get("stream")
    if stream:
        out.add_row("stream TTFT gateway - direct (p50)", f"{stream['ttft_p50_overhead_ms']:+.1f} ms", "≤ 10 ms")
        out.add_row("stream inter-token latency gateway / direct", f"{stream['itl_p50_ratio']:.2f}", "≤ 1.10")
    res = summary.get("resources")
    if res:
        out.add_row("idle CPU, whole stack", f"{res['idle_cpu_percent_of_one_core']['total']:.1f}% of a core", "< 20%")
        for name in ("gateway", "tokenize", "eval"):
            out.add_row(f"idle RSS {name}", f"{res['idle_rss_mb'].get(name, 0):.0f} MB", "< 150 MB")
    swap = summary.get("swap")
    if swap:
        out.add_row(
            "hot swap: failed / mixed responses", f"{swap['failed_requests']} / {swap['mixed_version_responses']}", "0 / 0"
        )
        for label, figures in (("1 infer replica", swap), ("2 infer replicas", swap.get("two_replicas", {}))):
            if figures:
                out.add_row(
                    f"hot swap, {label}: event to routed / p99 swap vs steady",
                    f"{figures['event_to_routed_s']:.2f}s / {figures['swap_window_p99_ms']:.0f} vs {figures['steady_p99_ms']:.0f} ms",
                    "",
                )
    scale = summary.get("scale")
    if scale:
        out.add_row("throughput, 2 infer replicas / 1", f"{scale['throughput_ratio_2_vs_1']:.2f}", "")
    shadow = summary.get("shadow")
    if shadow:
        for key, figures in shadow.items():
            if isinstance(figures, dict):
                out.add_row(
                    f"shadow 100% vs 0%, p50 / p99 ({key.replace('_', ' ')})",
                    f"x{figures['p50_ratio_100_vs_0']:.2f} / x{figures['p99_ratio_100_vs_0']:.2f}",
                    "noise",
                )
    scenario = summary.get("scenario")
    if scenario:
        out.add_row(
            "scenario template vs the same raw prompt, p50",
            f"{scenario['p50_delta_ms']:+.2f} ms (x{scenario['p50_ratio']:.3f}), answers equal: {scenario['answers_equal']}",
            "noise",
        )
    batching = summary.get("batching")
    if batching:
        for cell in batching["cells"]:
            tag = f"{cell['max_tokens']} tok, c={cell['concurrency']}"
            target = {1: "p50 within 10%", 16: "≥ 3x tokens/s"}.get(cell["concurrency"], "")
            out.add_row(
                f"batching / one thread: tokens/s, p50 ({tag})",
                f"x{cell['tokens_per_s_ratio']:.2f}, x{cell['p50_ratio']:.2f}",
                target,
            )
        ttft = batching["ttft_c16"]
        out.add_row("batching / one thread: TTFT p50 at c=16", f"x{ttft['p50_ratio']:.2f}", "≤ 1")
    engines = summary.get("engines")
    if engines:
        for row in engines["rows"]:
            tag = f"{row['engine']}, batch {row['batch']}, {row['max_tokens']} tok"
            if row["error"]:
                out.add_row(f"engines: {tag}", f"error: {row['error'][:80]}", "")
                continue
            out.add_row(
                f"engines: tokens/s, prompts equal to alone ({tag})",
                f"{row['tokens_per_s']:.0f}, {row['greedy_equal']:.0%}",
                "100%" if row["engine"] == "llmesh" else "",
            )
    soak = summary.get("soak")
    if soak:
        out.add_row(
            f"soak: failed of {soak['requests']} requests ({soak['releases']} releases)", str(soak["failed_requests"]), "0"
        )
        for name, growth in soak["rss_growth_mb"].items():
            out.add_row(
                f"soak: RSS growth {name}",
                f"{growth:+.1f} MB",
                "flat" if name in ("gateway", "tokenize", "infer", "eval") else "",
            )
    return out
