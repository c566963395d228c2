"""Sensitive content on production traffic, through a gateway with content lists: a refuse-list word
in a prompt is refused with a clear status; a redact-list word is masked in unary answers and in
streamed ones (where the raw stream split it across chunks); the lists are read again when their file
changes; the hit metric counts both; a refuse-list word in an answer stops it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest

from llmesh import client
from llmesh.common.content import MASK
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.gateways import new_key, start_keyed_gateway
from tests.e2e.metrics import metric_sum

pytestmark = pytest.mark.slow
PROMPTS = ("Return the number of", "This module provides", "Create a new", "The default value is", "A context manager")
REFUSE = "lists: [{name: secrets, action: refuse, words: [password]}]\n"


def _request(prompt: str) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(model="chat", prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=32, seed=3))


def _split_word(stub: gateway_pb2_grpc.GatewayStub) -> tuple[str, str]:
    """A prompt, and a word of its answer that the raw stream splits across two chunks."""
    for prompt in PROMPTS:
        chunks = [c.text for c in stub.GenerateStream(_request(prompt), timeout=60)]
        text, at = "".join(chunks), 0
        for chunk in chunks[:-1]:
            at += len(chunk)
            left, right = re.search(r"([A-Za-z]+)$", text[:at]), re.match(r"[A-Za-z]+", text[at:])
            if left and right and len(left.group(1) + right.group(0)) >= 3:
                return prompt, left.group(1) + right.group(0)
    pytest.skip("no answer had a word split across stream chunks")


def test_content_lists_refuse_prompts_and_mask_answers_streamed_or_not(mesh: StackLayout, gateway, tmp_path: Path):
    prompt, word = _split_word(gateway)
    unfiltered = gateway.Generate(_request(prompt), timeout=60).text
    rules = tmp_path / "content.yaml"
    rules.write_text(REFUSE)
    _, secret = new_key(mesh, "--scope", "generate")
    keyed = start_keyed_gateway(mesh, "gateway-content", tmp_path, LLMESH_CONTENT_RULES_FILE=str(rules))
    stub = gateway_pb2_grpc.GatewayStub(client.gateway_channel(keyed.address, api_key=secret, tls_ca=keyed.cert))
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(_request("Tell me the PASSWORD of"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "the prompt holds text that the secrets content list refuses"

        rules.write_text(
            f"lists:\n  - {{name: secrets, action: refuse, words: [password]}}\n  - {{name: pii, action: redact, words: [{word}]}}\n"
        )
        expected = re.sub(rf"\b{re.escape(word)}\b", MASK, unfiltered, flags=re.IGNORECASE)
        deadline = time.monotonic() + 30
        while (unary := stub.Generate(_request(prompt), timeout=60).text) != expected:  # read again within a second
            assert time.monotonic() < deadline, f"the new list did not apply: {unary!r}"
            time.sleep(0.5)
        streamed = "".join(c.text for c in stub.GenerateStream(_request(prompt), timeout=60))
        assert MASK in unary and not re.search(rf"\b{re.escape(word)}\b", unary, re.IGNORECASE)
        assert streamed == unary, "a word split across chunks is masked as in the whole answer"

        hits = {
            (where, action): metric_sum(keyed.metrics, "llmesh_gateway_sensitive_hits_total", where=where, action=action)
            for where, action in (("prompt", "refuse"), ("answer", "redact"))
        }
        assert hits[("prompt", "refuse")] == 1
        assert hits[("answer", "redact")] >= 2 * unfiltered.lower().count(word.lower())

        rules.write_text(f"lists: [{{name: stop, action: refuse, words: [{word}]}}]\n")  # now the answer is stopped
        deadline = time.monotonic() + 30
        while True:
            try:
                stub.Generate(_request(prompt), timeout=60)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                assert err.details() == "the answer was stopped: it held text that the stop content list refuses"
                break
            assert time.monotonic() < deadline, "the refuse list did not apply"
            time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as stopped:
            list(stub.GenerateStream(_request(prompt), timeout=60))
        assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        processes.stop(mesh, keyed.name)
