"""First look at mesh overhead: the same generate request straight to Triton vs through the gateway.

Needs a running stack (`llmesh up`). Prints JSON and writes it to bench/results/overhead.json.
    python bench/overhead.py [--requests 50] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import grpc

from llmesh.stack.layout import StackLayout, default_home
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc, tokenize_pb2, tokenize_pb2_grpc
from services.infer.triton import TritonGenerator

PROMPT = "Return the number of items in the list"


def _summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
    }


async def _direct(layout: StackLayout, ids: list[int], sampling: events_pb2.ResolvedSampling, n: int) -> list[float]:
    triton = TritonGenerator(layout.address("triton_grpc"))
    out = []
    for i in range(n):
        started = time.perf_counter()
        async for _ in triton.generate("chat-v1", f"bench-{i}", ids, sampling, timeout=60, stream=False):
            pass
        out.append((time.perf_counter() - started) * 1000)
    await triton.close()
    return out


def _gateway(layout: StackLayout, sampling: events_pb2.ResolvedSampling, n: int) -> list[float]:
    params = common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed
    )
    request = gateway_pb2.GenerateRequest(model="chat@1", prompt=PROMPT, sampling=params)
    out = []
    with grpc.insecure_channel(layout.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for _ in range(n):
            started = time.perf_counter()
            stub.Generate(request, timeout=60)
            out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    layout = StackLayout.load(default_home())
    assert layout, "no stack: run llmesh up"
    with grpc.insecure_channel(layout.address("tokenize")) as channel:
        ids = list(
            tokenize_pb2_grpc.TokenizerStub(channel)
            .Tokenize(tokenize_pb2.TokenizeRequest(model="chat", version=1, text=PROMPT))
            .ids
        )
    # temperature 0: every request generates exactly the same tokens on both paths
    sampling = events_pb2.ResolvedSampling(max_tokens=args.max_tokens, temperature=0.0, top_p=1.0, seed=1)
    warm = max(3, args.requests // 10)
    asyncio.run(_direct(layout, ids, sampling, warm))
    _gateway(layout, sampling, warm)
    direct, mesh = [], []
    for _ in range(2):  # interleave the two paths so that machine noise hits both
        direct += asyncio.run(_direct(layout, ids, sampling, args.requests // 2))
        mesh += _gateway(layout, sampling, args.requests // 2)
    d, g = _summary(direct), _summary(mesh)
    result = {
        "requests_each": len(direct),
        "max_tokens": args.max_tokens,
        "direct_triton": d,
        "gateway": g,
        "overhead_p50_ms": round(g["p50_ms"] - d["p50_ms"], 2),
        "overhead_p99_ms": round(g["p99_ms"] - d["p99_ms"], 2),
    }
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
