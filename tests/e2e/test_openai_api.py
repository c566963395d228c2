"""The gateway's OpenAI-compatible HTTP API, through the official `openai` SDK (sync and async):
the same answers as gRPC for the same seed, streaming, usage, models, pinned versions, keys,
quotas, bad requests; canaries and shadows apply to HTTP as to gRPC."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from llmesh.common.events import ReleaseMode
from llmesh.lm.build import BAD_RECIPE, build_model
from llmesh.loadgen import wait_for_primary
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, eval_pb2, eval_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.e2e.gateways import KeyedGateway, new_key, start_keyed_gateway
from tests.e2e.metrics import metric_sum
from tests.e2e.test_candidates import _release, _routing_candidate
from tests.e2e.test_security import _usage, _wait_settled

pytestmark = pytest.mark.slow
PROMPT = "Return the number of"
CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Return the number of"},
]


@pytest.fixture(scope="module")
def keyed(mesh: StackLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedGateway]:
    gateway = start_keyed_gateway(mesh, "gateway-openai", tmp_path_factory.mktemp("openai-tls"))
    yield gateway
    processes.stop(mesh, gateway.name)


@pytest.fixture(scope="module")
def secret(mesh: StackLayout) -> str:
    return new_key(mesh, "--scope", "generate")[1]


def _client(gateway: KeyedGateway, key: str) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=gateway.cert))
    return openai.OpenAI(base_url=gateway.http_url, api_key=key, max_retries=0, http_client=http_client)


def _http(gateway: KeyedGateway, timeout: float = 30) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=gateway.cert), timeout=timeout)


@pytest.fixture(scope="module")
def sdk(keyed: KeyedGateway, secret: str) -> Iterator[openai.OpenAI]:
    with _client(keyed, secret) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_stub(keyed: KeyedGateway, secret: str) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    credentials = grpc.ssl_channel_credentials(keyed.cert.read_bytes())
    with grpc.secure_channel(keyed.address, credentials) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def _grpc(stub: gateway_pb2_grpc.GatewayStub, secret: str, prompt: str, **sampling: object) -> gateway_pb2.GenerateResponse:
    request = gateway_pb2.GenerateRequest(model="chat", prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]
    return stub.Generate(request, timeout=60, metadata=[("x-api-key", secret)])


def _rendered(models_dir: Path, messages: list[dict[str, str]]) -> str:
    """The conversation as transformers renders it with the demo model's own tokenizer_config.json."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(models_dir / "chat-v1"))
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_completions_equal_grpc_unary_and_streamed_with_usage(sdk, grpc_stub, secret):
    expected = _grpc(grpc_stub, secret, PROMPT, max_tokens=24, temperature=0.8, seed=11)
    unary = sdk.completions.create(model="chat", prompt=PROMPT, max_tokens=24, temperature=0.8, seed=11)
    assert unary.choices[0].text == expected.text and expected.text
    assert unary.usage is not None
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    assert unary.system_fingerprint == "chat@1" and unary.object == "text_completion"
    assert unary.choices[0].finish_reason == ("length" if expected.finish_reason == common_pb2.FINISH_REASON_LENGTH else "stop")

    chunks = list(
        sdk.completions.create(
            model="chat",
            prompt=PROMPT,
            max_tokens=24,
            temperature=0.8,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert len([c for c in chunks if c.choices]) >= 2, "the answer was not streamed in pieces"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


def test_chat_goes_through_the_versions_chat_template_and_equals_grpc(sdk, grpc_stub, secret, models_dir):
    prompt = _rendered(models_dir, CONVERSATION)
    expected = _grpc(grpc_stub, secret, prompt, max_tokens=20, temperature=0.0)
    reply = sdk.chat.completions.create(model="chat", messages=CONVERSATION, max_completion_tokens=20, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage is not None and reply.usage.prompt_tokens == expected.usage.prompt_tokens
    streamed = sdk.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=20, temperature=0, stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta for c in streamed]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected.text


def test_async_client_many_at_once(keyed, secret, grpc_stub):
    expected = _grpc(grpc_stub, secret, PROMPT, max_tokens=12, temperature=0.9, seed=5).text

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=keyed.http_url,
            api_key=secret,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(verify=ssl.create_default_context(cafile=keyed.cert)),
        ) as client:

            async def one(i: int) -> str:
                if i % 2:
                    reply = await client.completions.create(model="chat", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=5)
                    return reply.choices[0].text
                stream = await client.completions.create(
                    model="chat", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=5, stream=True
                )
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(run()) == [expected] * 8


def test_models_list_and_a_pinned_version(sdk):
    ids = {model.id for model in sdk.models.list()}
    assert {"chat", "chat@1"} <= ids
    assert sdk.models.retrieve("chat@1").id == "chat@1"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("chat@999")
    pinned = sdk.completions.create(model="chat@1", prompt=PROMPT, max_tokens=4, temperature=0)
    assert pinned.system_fingerprint == "chat@1"


def test_keys_are_checked(mesh, keyed):
    with _client(keyed, "lmk_0000_not-a-key") as client, pytest.raises(openai.AuthenticationError) as refused:
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=4)
    assert refused.value.status_code == 401 and "not valid" in refused.value.message
    with _http(keyed) as http:  # no key at all (the SDK would not send a request without one)
        missing = http.post(f"{keyed.http_url}/completions", json={"model": "chat", "prompt": PROMPT})
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    _, reader = new_key(mesh, "--scope", "read")
    with _client(keyed, reader) as client, pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=4)  # type: ignore[arg-type]
    assert "generate" in denied.value.message


def test_a_quota_hit_is_a_rate_limit_error_with_retry_after(mesh, keyed):
    _, limited = new_key(mesh, "--rps", "0.5")
    with _client(keyed, limited) as client:
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=4)
        with pytest.raises(openai.RateLimitError) as limited_error:
            client.completions.create(model="chat", prompt=PROMPT, max_tokens=4)
    headers = limited_error.value.response.headers
    assert 0 < float(headers["retry-after"]) <= 2 and int(headers["retry-after-ms"]) > 0
    assert "requests per second" in limited_error.value.message


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be between 1 and"),
        ({"max_tokens": 100_000}, "max_tokens must be between 1 and"),
        ({"temperature": 5}, "temperature must be between 0 (greedy) and 2"),
        ({"n": 2}, "n must be 1"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": [1, 2, 3]}, "token ids are not supported"),
        ({"model": "Chat!"}, "model must be NAME or NAME@VERSION"),
        ({"stop": ["x" * 100]}, "each stop string must have 1 to"),
    ],
)
def test_a_bad_request_is_a_bad_request_error_saying_what_to_fix(sdk, call, message):
    arguments = {"model": "chat", "prompt": PROMPT, "max_tokens": 4} | call
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(**arguments)
    assert message in refused.value.message
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert "Traceback" not in refused.value.message


def test_unknown_models_malformed_json_and_oversized_bodies(sdk, keyed, secret):
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.completions.create(model="nosuchmodel", prompt=PROMPT, max_tokens=4)
    assert "known models" in missing.value.message
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    with _http(keyed) as http:
        broken = http.post(f"{keyed.http_url}/completions", content=b'{"model": "chat", "prompt": ', headers=headers)
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
        wrong = http.post(
            f"{keyed.http_url}/completions", json={"model": "chat", "prompt": PROMPT, "max_tokens": "4"}, headers=headers
        )
        assert wrong.status_code == 400 and "max_tokens" in wrong.json()["error"]["message"]
        huge = http.post(f"{keyed.http_url}/completions", content=b"x" * (2 << 20), headers=headers)
        assert huge.status_code == 413
        assert http.get(keyed.http_url.removesuffix("/v1") + "/readyz").status_code == 200


def _runs_to_max_tokens(keyed: KeyedGateway, secret: str, body: dict[str, object]) -> dict[str, object]:
    """`body` with a seed whose answer runs to max_tokens (it takes long enough to be cancelled)."""
    with _client(keyed, secret) as client:
        for seed in range(10):
            probe = client.completions.create(**body, temperature=2.0, seed=seed)  # type: ignore[call-overload]
            if probe.choices[0].finish_reason == "length":
                return body | {"temperature": 2.0, "seed": seed}
    raise AssertionError("no seed of ten gave an answer running to max_tokens")


def test_a_client_that_goes_away_cancels_its_generation_streaming_or_not(mesh, keyed):
    key_id, secret = new_key(mesh, "--tokens-per-minute", "6000")
    cancelled = mesh.address("infer_metrics"), "llmesh_infer_cancelled_total"
    before = metric_sum(*cancelled)
    body = _runs_to_max_tokens(keyed, secret, {"model": "chat@1", "prompt": "Return the number 2 of", "max_tokens": 400})
    _wait_settled(mesh, key_id, 1)
    probed = asyncio.run(_usage(mesh, key_id)).completion_tokens
    with _client(keyed, secret) as client:
        stream = client.completions.create(**body, stream=True)  # type: ignore[call-overload]
        assert next(iter(stream)).id.startswith("cmpl-")
        stream.close()  # the connection goes away mid-stream
    _wait_settled(mesh, key_id, 2)
    streamed = asyncio.run(_usage(mesh, key_id)).completion_tokens - probed
    with _http(keyed, timeout=0.3) as http, pytest.raises(httpx.TimeoutException):
        http.post(f"{keyed.http_url}/completions", json=body, headers={"authorization": f"Bearer {secret}"})
    _wait_settled(mesh, key_id, 3)
    assert metric_sum(*cancelled) - before == 2, "infer cancelled both generations"
    assert metric_sum(keyed.metrics, "llmesh_gateway_requests_total", code="CANCELLED") == 2
    assert streamed < 100, f"the key paid {streamed} tokens of a stream cancelled after its first chunk"


# ---- canaries and shadows, configured by release events, apply to HTTP as to gRPC ----------------------


def _open_client(mesh: StackLayout, key: str = "anonymous") -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.http_url(), api_key=key, max_retries=0)


def test_a_canary_splits_http_traffic_by_key_exactly_as_grpc(mesh, gateway, models_dir):
    model = "httpcanary"  # its policy holds: nothing is decided while we count
    _release(mesh, 1, models_dir / "chat-v1", ReleaseMode.SWAP, model=model)
    wait_for_primary(gateway, model, 1, timeout=120)
    _release(mesh, 2, models_dir / "chat-v1", ReleaseMode.CANARY, share=50, model=model)
    _routing_candidate(gateway, model, 2)
    by_http, by_grpc = {}, {}
    for i in range(40):
        key = f"canary-key-{i}"
        with _open_client(mesh, key) as client:
            reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
        by_http[key] = int(str(reply.system_fingerprint).rpartition("@")[2])
        request = gateway_pb2.GenerateRequest(model=model, prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=1))
        by_grpc[key] = gateway.Generate(request, timeout=30, metadata=[("x-api-key", key)]).version
    assert by_http == by_grpc
    assert set(by_http.values()) == {1, 2}, "a 50% canary served no key from one of the versions"


def test_a_shadow_mirrors_http_requests_and_eval_scores_them(mesh, gateway, models_dir):
    model = "httpshadow"
    bad = models_dir / "chat-bad"
    if not (bad / "model.safetensors").exists():
        build_model(BAD_RECIPE, bad)
    _release(mesh, 1, models_dir / "chat-v1", ReleaseMode.SWAP, model=model)
    wait_for_primary(gateway, model, 1, timeout=120)
    with _open_client(mesh) as client:
        baseline = [
            client.completions.create(model=model, prompt=f"{PROMPT} {i}", max_tokens=8, seed=i).choices[0].text for i in range(6)
        ]
        _release(mesh, 2, bad, ReleaseMode.SHADOW, share=100, model=model)
        _routing_candidate(gateway, model, 2)
        answers = [client.completions.create(model=model, prompt=f"{PROMPT} {i}", max_tokens=8, seed=i) for i in range(6)]
    assert [a.choices[0].text for a in answers] == baseline, "shadow traffic changed what HTTP clients got"
    assert {a.system_fingerprint for a in answers} == {f"{model}@1"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with grpc.insecure_channel(mesh.address("eval")) as channel:
            report = eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(model=model), timeout=10)
        if report.candidates and report.candidates[0].pairs >= 6:
            break
        time.sleep(0.2)
    assert report.candidates and report.candidates[0].pairs == 6 and report.candidates[0].missing == 0, json.dumps(
        str(report.candidates)
    )
