"""`llmesh eval backtest` and `llmesh eval report` through the real mesh."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmesh import client
from llmesh.loadgen import wait_for_primary
from llmesh.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "llmesh.cli"]


def _run(*args: str) -> str:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_backtest_of_the_example_cases_against_two_versions(mesh, gateway, tmp_path: Path):
    for version in (1, 2):  # model "bt": v2 serves, v1 stays loaded as the previous version
        event = client.release_for("bt", version, mesh.models_dir / f"chat-v{version}")
        asyncio.run(client.publish_release(mesh.address("broker"), event))
        wait_for_primary(gateway, "bt", version)
    cases = REPO / "examples" / "cases.jsonl"
    assert len(cases.read_text().splitlines()) >= 100
    out = _run("eval", "backtest", "--model", "bt", "--version", "2", "--against", "1", "--cases", str(cases),
               "--home", str(mesh.home), "--json", str(tmp_path / "bt.json"), "--html", str(tmp_path / "bt.html"))  # fmt: skip
    for metric in ("exact_match", "rouge_l", "embedding_cosine", "precision", "recall", "f1"):
        assert metric in out
    result = json.loads((tmp_path / "bt.json").read_text())
    assert [s["cases"] for s in result["summary"]] == [120, 120]
    assert all(s["errors"] == 0 for s in result["summary"])
    assert result["summary"][0]["labelled"] == 120
    answers = {v: {c["id"]: c["answer"] for c in result["cases"][v]} for v in ("1", "2")}
    assert len(answers["1"]) == len(answers["2"]) == 120 and any(answers["1"].values())
    assert answers["1"] != answers["2"], "two versions trained differently should answer differently"
    assert "<img" in (tmp_path / "bt.html").read_text()


def test_eval_report_as_json_and_html(mesh, gateway, tmp_path: Path):
    request = gateway_pb2.GenerateRequest(model="chat", prompt="The", sampling=common_pb2.SamplingParams(max_tokens=2))
    gateway.Generate(request, timeout=30, metadata=[("x-api-key", "report-key"), ("x-scenario", "report-test")])
    time.sleep(1)  # eval consumes the record asynchronously
    out = _run("eval", "report", "--json", "--home", str(mesh.home), "--html", str(tmp_path / "report.html"))
    data = json.loads(out[: out.rindex("}") + 1])
    assert "chat" in {row["model"] for row in data["versions"]}
    assert "report-test" in {row["scenario"] for row in data["usage"]}
    assert sum(int(row["requests"]) for row in data["usage"]) >= 1
    page = (tmp_path / "report.html").read_text()
    assert "Candidates vs primary" in page and "<img" in page


def test_backtest_gates_a_pipeline_with_fail_under(mesh, gateway, tmp_path: Path):
    """Exit 0 when every threshold holds, 1 (saying which failed) when one does not, 2 on a bad one."""
    wait_for_primary(gateway, "bt", 2)  # released by the test above
    cases = REPO / "examples" / "gate-cases.jsonl"
    base = [*CLI, "eval", "backtest", "--model", "bt", "--version", "2", "--cases", str(cases), "--home", str(mesh.home)]

    def gated(*thresholds: str) -> subprocess.CompletedProcess[str]:
        args = [a for t in thresholds for a in ("--fail-under", t)]
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})

    passed = gated("pass_rate=0.4", "rouge_l=0.0")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "PASS bt@2" in passed.stdout and "pass_rate" in passed.stdout
    failed = gated("pass_rate=0.5", "rouge_l=0.99")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAIL bt@2: rouge_l" in failed.stdout and "pass_rate" not in failed.stdout.split("FAIL", 1)[1]
    bad = gated("bleu=0.5")
    assert bad.returncode == 2 and "METRIC=VALUE" in bad.stdout
