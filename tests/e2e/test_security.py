"""A gateway that requires API keys and speaks TLS (a self-signed certificate made here), beside
the stack's open one: keys made with `llmesh keys`, scopes, revocation, per-key quotas and usage."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmesh import client
from llmesh.common.apikeys import ApiKeyStore
from llmesh.stack import processes
from llmesh.stack.layout import StackLayout
from llmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.gateways import keys_cli, new_key, start_keyed_gateway
from tests.e2e.metrics import metric_sum

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secure(mesh: StackLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The address of a gateway with keys required, TLS on and room for 2 requests at once, and the
    certificate to trust."""
    gateway = start_keyed_gateway(mesh, "gateway-secure", tmp_path_factory.mktemp("tls"), LLMESH_MAX_WAITING="2")
    yield gateway.address, gateway.cert
    processes.stop(mesh, gateway.name)


def _stub(secure: tuple[str, Path], key: str | None) -> gateway_pb2_grpc.GatewayStub:
    address, cert = secure
    return gateway_pb2_grpc.GatewayStub(client.gateway_channel(address, api_key=key or "", tls_ca=cert))


REQUEST = gateway_pb2.GenerateRequest(
    model="chat", prompt="Return the number of", sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0)
)


def test_calls_without_a_live_key_are_refused(mesh, secure):
    for key in (None, "lmk_0000_not-a-key"):
        with pytest.raises(grpc.RpcError) as refused:
            _stub(secure, key).Generate(REQUEST, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in refused.value.details()
    with pytest.raises(grpc.RpcError) as plain:  # TLS only: a plaintext client gets nowhere
        gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(secure[0])).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_scopes_and_revocation(mesh, secure):
    key_id, secret = new_key(mesh, "--scope", "generate")
    reply = _stub(secure, secret).Generate(REQUEST, timeout=30)
    assert reply.text and reply.version == 1
    assert "".join(c.text for c in _stub(secure, secret).GenerateStream(REQUEST, timeout=30)) == reply.text
    address, cert = secure
    bearer = grpc.secure_channel(address, grpc.ssl_channel_credentials(cert.read_bytes()))
    models = gateway_pb2_grpc.GatewayStub(bearer).ListModels(
        gateway_pb2.ListModelsRequest(), timeout=10, metadata=[("authorization", f"Bearer {secret}")]
    )
    assert "chat" in [m.name for m in models.models]
    admin = gateway_pb2_grpc.AdminStub(client.gateway_channel(address, api_key=secret, tls_ca=cert))
    with pytest.raises(grpc.RpcError) as denied:
        admin.Rollback(gateway_pb2.RollbackRequest(model="no-such-model"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in denied.value.details()
    _, admin_secret = new_key(mesh, "--scope", "admin")
    admin = gateway_pb2_grpc.AdminStub(client.gateway_channel(address, api_key=admin_secret, tls_ca=cert))
    with pytest.raises(grpc.RpcError) as allowed:  # past the key check, refused for the model
        admin.Rollback(gateway_pb2.RollbackRequest(model="no-such-model"), timeout=10)
    assert allowed.value.code() == grpc.StatusCode.NOT_FOUND
    assert "revoked" in keys_cli(mesh, "revoke", key_id)
    time.sleep(2.5)  # gateways cache a key's check for 2 s
    with pytest.raises(grpc.RpcError) as revoked:
        _stub(secure, secret).Generate(REQUEST, timeout=10)
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rate_limit_answers_resource_exhausted_with_retry_information(mesh, secure):
    _, secret = new_key(mesh, "--rps", "0.5")
    stub = _stub(secure, secret)
    stub.Generate(REQUEST, timeout=30)
    with pytest.raises(grpc.RpcError) as limited:
        stub.Generate(REQUEST, timeout=30)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests per second" in limited.value.details()
    retry_ms = int(dict(limited.value.trailing_metadata())["retry-after-ms"])
    assert 0 < retry_ms <= 2000
    time.sleep(retry_ms / 1000 + 0.1)
    assert stub.Generate(REQUEST, timeout=30).text


def test_token_budget_and_usage_per_key(mesh, secure):
    key_id, secret = new_key(mesh, "--tokens-per-minute", "30")
    stub = _stub(secure, secret)
    big = gateway_pb2.GenerateRequest()
    big.CopyFrom(REQUEST)
    big.sampling.max_tokens = 25
    reply = stub.Generate(big, timeout=30)  # holds prompt + 25 of the 30 while it runs
    with pytest.raises(grpc.RpcError) as limited:
        stub.Generate(big, timeout=30)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens per minute" in limited.value.details()

    async def usage() -> tuple[int, int, int]:
        store = ApiKeyStore.from_url(mesh.redis_url)
        try:
            for _ in range(50):
                u = await store.usage(key_id)
                if u.requests:
                    return u.requests, u.prompt_tokens, u.completion_tokens
                await asyncio.sleep(0.1)
            return 0, 0, 0
        finally:
            await store.close()

    assert asyncio.run(usage()) == (1, reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert f"{reply.usage.prompt_tokens}/{reply.usage.completion_tokens}" in keys_cli(mesh, "list")


def test_beyond_its_bound_the_gateway_answers_resource_exhausted(mesh, secure):
    from concurrent.futures import ThreadPoolExecutor

    _, secret = new_key(mesh)
    stub = _stub(secure, secret)
    long = gateway_pb2.GenerateRequest()
    long.CopyFrom(REQUEST)
    long.sampling.max_tokens = 96

    def one(_: int) -> str:
        try:
            return "".join(c.text for c in stub.GenerateStream(long, timeout=60)) and "OK"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2 requests" in err.details()
            return "RESOURCE_EXHAUSTED"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    assert "RESOURCE_EXHAUSTED" in outcomes and "OK" in outcomes
    assert stub.Generate(REQUEST, timeout=30).text, "the gateway serves again once the load is gone"


def test_a_signed_release_of_a_folder_outside_the_artifact_roots_is_refused(mesh: StackLayout, models_dir: Path):
    """The embedded stack allows only the demo models, the folders named at `up` and the model store:
    a Kafka client holding the key still cannot make infer read an arbitrary folder."""
    from tests.e2e.kafka_tools import release_dead_letter

    outside = Path(tempfile.mkdtemp(prefix="llmesh-outside-", dir="/var/tmp"))
    try:
        shutil.copytree(models_dir / "chat-v2", outside / "chat", dirs_exist_ok=True)
        event = client.release_for("outside", 1, outside / "chat")
        asyncio.run(client.publish_release(mesh.address("broker"), event))
        assert "outside the model store" in release_dead_letter(mesh.address("broker"), event.event_id)
    finally:
        shutil.rmtree(outside)


def _triton_tally(mesh: StackLayout, name: str = "generated_tokens") -> float:
    """What the model's stubs inside Triton count for chat@1 (services/infer/triton_model/model.py,
    Tally), as the infer service exports it: `generated_tokens` or `cancelled`."""
    return metric_sum(mesh.address("infer_metrics"), f"llmesh_triton_{name}_total", model="chat", version="1")


def test_cancelled_streams_stop_in_triton_and_the_key_pays_what_was_generated(mesh, secure):
    key_id, secret = new_key(mesh, "--tokens-per-minute", "600")
    stub = _stub(secure, secret)
    infer_metrics = mesh.address("infer_metrics")
    before = (
        metric_sum(infer_metrics, "llmesh_infer_generated_tokens_total", model="chat", version="1"),
        metric_sum(infer_metrics, "llmesh_infer_cancelled_total"),
        _triton_tally(mesh),
        _triton_tally(mesh, "cancelled"),
    )
    sampling = common_pb2.SamplingParams(max_tokens=200, temperature=0.0)
    for n in range(8):
        request = gateway_pb2.GenerateRequest(model="chat@1", prompt=f"Return the number {n} of", sampling=sampling)
        call = stub.GenerateStream(request, timeout=60)
        assert next(call).text is not None  # the first chunk
        call.cancel()
        _wait_settled(mesh, key_id, n + 1)
    generated = metric_sum(infer_metrics, "llmesh_infer_generated_tokens_total", model="chat", version="1") - before[0]
    _wait_stopped_in_triton(mesh, before[3] + 8)
    in_triton = _triton_tally(mesh) - before[2]
    usage = asyncio.run(_usage(mesh, key_id))
    print(f"8 cancelled streams: infer received {generated:.0f} tokens, Triton generated {in_triton:.0f}, the key paid {usage}")
    assert metric_sum(infer_metrics, "llmesh_infer_cancelled_total") - before[1] == 8
    assert usage.requests == 8 and usage.completion_tokens == generated, "charged exactly what was generated"
    assert generated <= in_triton < 8 * 200 / 4, "the generations stopped long before max_tokens"


def _wait_stopped_in_triton(mesh: StackLayout, cancelled: float) -> None:
    deadline = time.monotonic() + 30
    running = {"model": "chat", "version": "1", "state": "running"}
    while (
        _triton_tally(mesh, "cancelled") < cancelled
        or metric_sum(mesh.address("infer_metrics"), "llmesh_infer_sequences", **running) > 0
    ):
        assert time.monotonic() < deadline, "Triton did not stop every cancelled generation"
        time.sleep(0.05)


def _wait_settled(mesh: StackLayout, key_id: str, requests: int) -> None:
    deadline = time.monotonic() + 30
    while asyncio.run(_usage(mesh, key_id)).requests < requests:
        assert time.monotonic() < deadline, "the cancelled request was not settled"
        time.sleep(0.05)


async def _usage(mesh: StackLayout, key_id: str):  # type: ignore[no-untyped-def]
    store = ApiKeyStore.from_url(mesh.redis_url)
    try:
        return await store.usage(key_id)
    finally:
        await store.close()
