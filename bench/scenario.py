"""Scenario cost: a request through a released scenario (the gateway reads its state, picks the
template version, renders the prompt from typed variables) against the very same prompt sent raw,
interleaved request by request at one client, in one run. The answers must be equal."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import pyplot, save, summary
from llmesh import client
from llmesh.common.prompts import PromptRelease
from llmesh.loadgen import wait_for_primary
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODEL = SCENARIO = "scenariocost"
TEMPLATE = "Return the number of {{ what }} in the {{ where }}"
VARIABLES = {"what": "items", "where": "list"}
MAX_TOKENS = 16


def _released(layout: StackLayout, stub: gateway_pb2_grpc.GatewayStub) -> None:
    bootstrap = layout.address("broker")
    asyncio.run(client.publish_release(bootstrap, client.release_for(MODEL, 1, layout.models_dir / "chat-v1")))
    wait_for_primary(stub, MODEL, 1, timeout=120)
    params = {name: {"type": "string"} for name in VARIABLES}
    event = PromptRelease.model_validate(
        {"scenario": SCENARIO, "version": 1, "model": MODEL, "template": {"text": TEMPLATE, "params": params}}
    )
    asyncio.run(client.publish_prompt_release(bootstrap, event.signed(layout.release_key().encode())))
    deadline = time.monotonic() + 60
    while not any(s.name == SCENARIO for s in stub.ListScenarios(gateway_pb2.ListScenariosRequest(), timeout=5).scenarios):
        if time.monotonic() > deadline:
            raise TimeoutError(f"scenario {SCENARIO} was not applied")
        time.sleep(0.1)


def _requests() -> dict[str, gateway_pb2.GenerateRequest]:
    sampling = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=1)
    raw = TEMPLATE.replace("{{ what }}", VARIABLES["what"]).replace("{{ where }}", VARIABLES["where"])
    templated = gateway_pb2.GenerateRequest(scenario=SCENARIO, sampling=sampling)
    templated.variables.update(VARIABLES)
    return {"raw prompt": gateway_pb2.GenerateRequest(model=MODEL, prompt=raw, sampling=sampling), "scenario": templated}


def run(layout: StackLayout, out: Path, quick: bool) -> dict[str, Any]:
    rounds = 20 if quick else 200
    requests = _requests()
    latencies: dict[str, list[float]] = {name: [] for name in requests}
    texts: dict[str, set[str]] = {name: set() for name in requests}
    with grpc.insecure_channel(layout.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        _released(layout, stub)
        for n in range(rounds + 3):  # 3 warm-up rounds; the order alternates so neither side always goes first
            for name in list(requests)[:: 1 if n % 2 else -1]:
                started = time.perf_counter()
                reply = stub.Generate(requests[name], timeout=60)
                if n >= 3:
                    latencies[name].append((time.perf_counter() - started) * 1000)
                    texts[name].add(reply.text)
    figures = {name: summary(values) for name, values in latencies.items()}
    raw, templated = figures["raw prompt"], figures["scenario"]
    plot(latencies, out / "scenario_cost.png")
    return {
        "rounds": rounds,
        "raw_prompt": raw,
        "scenario": templated,
        "p50_delta_ms": round(templated["p50_ms"] - raw["p50_ms"], 2),
        "p50_ratio": round(templated["p50_ms"] / raw["p50_ms"], 3),
        "answers_equal": texts["raw prompt"] == texts["scenario"] and len(texts["scenario"]) == 1,
    }


def plot(latencies: dict[str, list[float]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot(list(latencies.values()), showfliers=False)
    ax.set_xticks(range(1, len(latencies) + 1), list(latencies))
    ax.set_ylabel("latency (ms)")
    ax.set_title("A scenario's template against the same prompt sent raw")
    save(fig, path, dpi=120)
