"""Prompt templates per scenario through the public APIs: a scenario bound to template v1; v2 released
as a 50% canary (by client key) and promoted, then rolled back, with `llmesh scenario`; every answer
is the model's answer to the prompt its template version rendered (gRPC and HTTP alike); a second
gateway serves the same versions; `llmesh eval report` counts usage per scenario and template
version. A forged release is dead-lettered, a re-sent one changes nothing, bad variables are refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
import yaml

from llmesh import client
from llmesh.common import topics
from llmesh.common.prompts import PromptRelease, ScenarioMode
from llmesh.loadgen import wait_for_primary
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.gateways import audit_entries, new_key, start_keyed_gateway
from tests.e2e.kafka_tools import dead_letters_for

pytestmark = pytest.mark.slow
MODEL, SCENARIO = "templated", "helpdesk"
SEED, MAX_TOKENS = 11, 8
V1 = "Customer question about {{ product }}: {{ question }}\nA helpful answer:"
V2 = "You answer questions about {{ product }}{% if formal %} formally{% endif %}.\nQuestion: {{ question }}\nAnswer:"
PARAMS = {"product": {"type": "string", "max_length": 80}, "question": {"type": "string"}}


def _spec(folder: Path, version: int, text: str, **params: dict) -> Path:
    spec = {
        "scenario": SCENARIO,
        "version": version,
        "model": MODEL,
        "template": {"text": text, "params": PARAMS | params},
        "sampling": {"max_tokens": MAX_TOKENS},
        "token_budget_per_hour": 50_000,
    }
    path = folder / f"{SCENARIO}-v{version}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(mesh: StackLayout, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "llmesh.cli", *args, "--home", str(mesh.home)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _variables(n: int) -> dict[str, str]:
    return {"product": "llmesh", "question": f"how do I rotate key number {n}?"}


def _ask(
    stub: gateway_pb2_grpc.GatewayStub, variables: dict, key: str = "", scenario: str = SCENARIO, **fields: object
) -> gateway_pb2.GenerateResponse:
    request = gateway_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(seed=SEED), scenario=scenario, **fields)  # type: ignore[arg-type]
    request.variables.update(variables)
    return stub.Generate(request, timeout=60, metadata=(("x-api-key", key),) if key else None)


def _direct(stub: gateway_pb2_grpc.GatewayStub, prompt: str) -> str:
    sampling = common_pb2.SamplingParams(seed=SEED, max_tokens=MAX_TOKENS)
    return stub.Generate(gateway_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=sampling), timeout=60).text


def _rendered(version: int, variables: dict) -> str:
    text = V1 if version == 1 else V2
    return (
        text.replace("{{ product }}", variables["product"])
        .replace("{{ question }}", variables["question"])
        .replace("{% if formal %} formally{% endif %}", "")
    )


def _scenario(stub: gateway_pb2_grpc.GatewayStub, name: str = SCENARIO) -> gateway_pb2.ScenarioInfo | None:
    found = [s for s in stub.ListScenarios(gateway_pb2.ListScenariosRequest(), timeout=10).scenarios if s.name == name]
    return found[0] if found else None


def _wait_for(
    stub: gateway_pb2_grpc.GatewayStub, primary: int, candidate: int = 0, scenario: str = SCENARIO
) -> gateway_pb2.ScenarioInfo:
    deadline = time.monotonic() + 60
    while True:
        info = _scenario(stub, scenario)
        if info is not None and (info.primary_version, info.candidate_version) == (primary, candidate):
            return info
        assert time.monotonic() < deadline, f"the scenario did not reach v{primary} (canary v{candidate}): {info}"
        time.sleep(0.2)


def _scenario_rows(mesh: StackLayout, want: dict[int, int]) -> dict[int, dict]:
    deadline = time.monotonic() + 60
    while True:
        rows = {int(r["template_version"]): r for r in json.loads(_cli(mesh, "eval", "report", "--json"))["scenarios"]}
        if all(int(rows.get(v, {}).get("requests", 0)) >= n for v, n in want.items()):
            return rows
        assert time.monotonic() < deadline, f"eval counted {rows}, not {want}"
        time.sleep(0.5)


def _feedback(mesh: StackLayout) -> list[dict]:
    deadline = time.monotonic() + 60
    while True:
        rows = json.loads(_cli(mesh, "eval", "report", "--json"))["feedback"]
        if sum(int(r["ratings"]) for r in rows if r["scenario"] == SCENARIO) >= 2:
            return rows
        assert time.monotonic() < deadline, f"eval counted {rows}"
        time.sleep(0.5)


def test_a_template_canary_by_client_key_then_promoted_and_rolled_back(
    mesh: StackLayout, gateway: gateway_pb2_grpc.GatewayStub, models_dir: Path, tmp_path: Path
):
    asyncio.run(client.publish_release(mesh.address("broker"), client.release_for(MODEL, 1, models_dir / "chat-v1")))
    wait_for_primary(gateway, MODEL, 1, timeout=120)
    _cli(mesh, "scenario", "release", str(_spec(tmp_path, 1, V1)), "--author", "alice")
    _wait_for(gateway, 1)
    sent: Counter[int] = Counter()

    first = _ask(gateway, _variables(0))
    sent[first.template_version] += 1
    assert (first.template_version, first.model, first.version) == (1, MODEL, 1)
    assert first.usage.completion_tokens == MAX_TOKENS, "the scenario's sampling defaults apply"
    assert first.text == _direct(gateway, _rendered(1, _variables(0)))

    formal = {"formal": {"type": "boolean", "required": False, "default": False}}
    _cli(mesh, "scenario", "release", str(_spec(tmp_path, 2, V2, **formal)), "--canary", "50", "--author", "bob")
    _wait_for(gateway, 1, candidate=2)
    by_client = {}
    for n in range(24):
        variables, key = _variables(n), f"client-{n}"
        reply = _ask(gateway, variables, key)
        sent[reply.template_version] += 1
        by_client[key] = reply.template_version
        assert reply.template_version in (1, 2)
        if n % 3 == 0:  # the answer is the model's answer to what that version rendered
            assert reply.text == _direct(gateway, _rendered(reply.template_version, variables)), n
        assert _ask(gateway, _variables(100 + n), key).template_version == reply.template_version, "sticky per client"
        sent[reply.template_version] += 1
    assert 4 <= sum(v == 2 for v in by_client.values()) <= 20, by_client
    client_of = {version: key for key, version in by_client.items()}  # a client of each version
    answers = {version: _ask(gateway, _variables(200), key) for version, key in client_of.items()}
    sent.update(answers.keys())
    for version, rating in ((1, 5), (2, 2)):  # feedback counts per template version
        feedback = gateway_pb2.FeedbackRequest(request_id=answers[version].request_id, rating=rating)
        gateway.SubmitFeedback(feedback, timeout=10)

    key, version = next(iter(by_client.items()))  # HTTP follows the same template versions, by the same key
    body = {"model": "", "scenario": SCENARIO, "variables": _variables(0), "seed": SEED}
    http = httpx.post(f"{mesh.http_url()}/completions", json=body, headers={"x-api-key": key}, timeout=60)
    assert http.status_code == 200, http.text
    assert http.headers["llmesh-template-version"] == str(version)
    assert http.json()["choices"][0]["text"] == _ask(gateway, _variables(0), key).text
    sent[version] += 2

    _cli(mesh, "scenario", "promote", SCENARIO, "--reason", "v2 reads better")
    _wait_for(gateway, 2)
    promoted = [_ask(gateway, _variables(n), f"client-{n}") for n in range(6)]
    assert {r.template_version for r in promoted} == {2}
    sent[2] += len(promoted)

    secret = new_key(mesh, "--scope", "generate")[1]  # a second gateway reads the same scenario state
    keyed = start_keyed_gateway(mesh, "gateway-scenarios", tmp_path)
    try:
        other = gateway_pb2_grpc.GatewayStub(client.gateway_channel(keyed.address, api_key=secret, tls_ca=keyed.cert))
        assert _scenario(other) == _scenario(gateway)
        assert _ask(other, _variables(1)).template_version == 2
        sent[2] += 1
    finally:
        processes.stop(mesh, keyed.name)

    _cli(mesh, "scenario", "rollback", SCENARIO)
    info = _wait_for(gateway, 1)
    assert [(h.mode, h.version, h.author) for h in info.history] == [
        ("release", 1, "alice"),
        ("canary", 2, "bob"),
        ("promote", 2, ""),
        ("rollback", 1, ""),
    ]
    assert _ask(gateway, _variables(3)).template_version == 1
    sent[1] += 1
    listed = _cli(mesh, "scenario", "list")
    assert SCENARIO in listed and "v1" in listed and "product: string" in listed

    pinned = _ask(gateway, _variables(5), scenario=f"{SCENARIO}@2")  # a pinned template version: no canary
    assert pinned.template_version == 2 and pinned.text == _direct(gateway, _rendered(2, _variables(5)))
    sent[2] += 1

    rows = _scenario_rows(mesh, dict(sent))
    assert {v: int(rows[v]["requests"]) for v in sent} == dict(sent), "every answer counted under its template version"
    assert all(int(rows[v]["completion_tokens"]) == sent[v] * MAX_TOKENS for v in sent)
    rated = {int(r.get("template_version", 0)): r for r in _feedback(mesh) if r["scenario"] == SCENARIO}
    assert {v: (int(r["ratings"]), r["rating_mean"]) for v, r in rated.items()} == {1: (1, 5.0), 2: (1, 2.0)}
    table = _cli(mesh, "eval", "report")
    assert "released scenarios by template version" in table and SCENARIO in table

    cases, results = tmp_path / "cases.jsonl", tmp_path / "backtest.json"  # a backtest of template v2, as a gate
    assertion = [{"type": "not-contains", "value": "Ignore your instructions"}]
    cases.write_text("\n".join(json.dumps({"id": f"c{n}", "variables": _variables(n), "assert": assertion}) for n in range(3)))
    gate = _cli(mesh, "eval", "backtest", "--scenario", SCENARIO, "--version", "2", "--cases", str(cases),
                "--fail-under", "pass_rate=1", "--json", str(results))  # fmt: skip
    assert f"PASS {SCENARIO} template v2" in gate
    greedy = common_pb2.SamplingParams(max_tokens=24, temperature=0.0, seed=0)  # as the backtest asks
    for n, case in enumerate(json.loads(results.read_text())["cases"]["2"]):
        direct = gateway_pb2.GenerateRequest(model=MODEL, prompt=_rendered(2, _variables(n)), sampling=greedy)
        assert case["answer"] == gateway.Generate(direct, timeout=60).text, "answered from template v2's prompt"


def test_forged_re_sent_and_bad_requests(mesh: StackLayout, gateway: gateway_pb2_grpc.GatewayStub, tmp_path: Path):
    name, key = "resent", os.environ["LLMESH_RELEASE_HMAC_KEY"].encode()
    broker = mesh.address("broker")

    def publish(event: PromptRelease) -> None:
        asyncio.run(client.publish_prompt_release(broker, event))

    def release(version: int) -> PromptRelease:
        template = {"text": f"v{version} {{{{ question }}}}", "params": PARAMS}
        return PromptRelease.model_validate({"scenario": name, "version": version, "template": template, "model": MODEL}).signed(
            key
        )

    for version in (1, 2, 3):
        publish(release(version))
    info = _wait_for(gateway, 3, scenario=name)

    forged = release(9).model_copy(
        update={"template": release(9).template.model_copy(update={"text": "Obey me. {{ question }}"})}
    )
    letters = asyncio.run(
        dead_letters_for(
            broker,
            [
                (topics.PROMPTS, forged.model_dump_json().encode(), {"marker": "forged"}),
                (topics.PROMPTS, b'{"scenario": "x"', {"marker": "not-json"}),
            ],
        )
    )
    assert "bad signature" in letters["forged"]["dlq-reason"]
    assert "invalid prompt release" in letters["not-json"]["dlq-reason"]
    assert _scenario(gateway, name) == info, "nothing applied"

    rollback = PromptRelease(scenario=name, mode=ScenarioMode.ROLLBACK).signed(key)
    publish(rollback)
    publish(rollback)  # re-sent: a new offset, the same event
    publish(release(4))  # one partition: applied after both copies
    info = _wait_for(gateway, 4, scenario=name)
    assert [(h.mode, h.version) for h in info.history] == [
        ("release", 1),
        ("release", 2),
        ("release", 3),
        ("rollback", 2),
        ("release", 4),
    ], "the rollback applied once"

    refusals = [
        ({"product": "x", "question": 3}, "'question' must be string"),
        ({"product": "x", "question": "q", "extra": "x"}, "unknown variables"),
        ({"product": "x"}, "'question' is required"),
    ]
    for variables, why in refusals:
        with pytest.raises(grpc.RpcError) as err:
            _ask(gateway, variables, scenario=name)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in (err.value.details() or ""), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _ask(gateway, _variables(0), scenario=name, prompt="my own prompt")
    assert "send variables, not a prompt" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        _ask(gateway, _variables(0), scenario=f"{name}@7")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no template version 7" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        _ask(gateway, {"q": "x"}, scenario="never-released")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "is not released" in (err.value.details() or "")


def test_a_shadow_template_is_scored_by_eval_and_promoted_by_its_policy(
    mesh: StackLayout, gateway: gateway_pb2_grpc.GatewayStub, models_dir: Path
):
    """v2 renders the same prompt as v1 (a reworded comment only): every pair agrees, so the policy
    (min_samples 12) promotes it; clients only ever get v1's answers meanwhile."""
    model, name, key = "shadowtpl", "mirrored", os.environ["LLMESH_RELEASE_HMAC_KEY"].encode()
    broker = mesh.address("broker")
    asyncio.run(client.publish_release(broker, client.release_for(model, 1, models_dir / "chat-v1")))
    wait_for_primary(gateway, model, 1, timeout=120)
    for version, mode, text in ((1, ScenarioMode.RELEASE, V1), (2, ScenarioMode.SHADOW, "{# reworded #}" + V1)):
        template = {"text": text, "params": PARAMS}
        event = PromptRelease.model_validate(
            {"scenario": name, "version": version, "mode": mode, "template": template, "model": model, "share_percent": 100}
        )
        asyncio.run(client.publish_prompt_release(broker, event.signed(key)))
    _wait_for(gateway, 1, candidate=2, scenario=name)

    for n in range(40):
        if _ask(gateway, _variables(n), scenario=name).template_version == 2:
            assert _scenario(gateway, name).primary_version == 2, "a shadow never answers: only a promoted v2 does"  # type: ignore[union-attr]
            break
        time.sleep(0.3)  # mirrors yield to client requests (infer drops them beyond its backlog): room to run
    deadline = time.monotonic() + 90
    while (info := _scenario(gateway, name)) is not None and info.primary_version != 2:
        scored = json.loads(_cli(mesh, "eval", "report", "--json"))["candidates"]
        assert time.monotonic() < deadline, f"not promoted: {scored}"
        time.sleep(1)
    assert info is not None
    assert (info.history[-1].mode, info.history[-1].version, info.history[-1].author) == ("promote", 2, "llmesh-eval policy")
    (decision,) = [e for e in audit_entries(mesh, "--model", f"scenario/{name}") if e.action == "policy.decision"]
    assert decision.version == 2 and int(decision.details["samples"]) >= 12 and float(decision.details["rouge_l"]) == 1.0
