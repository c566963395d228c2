"""API keys on every service's gRPC API (llmesh/common/keycheck.py), on an in-process server holding
each of the mesh's services: no key, an unknown key or the wrong scope is refused; health and
reflection stay open; eval's report shows every key's usage to an admin key only."""

from __future__ import annotations

import importlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from llmesh.common.apikeys import ApiKey, Scope
from llmesh.common.keycheck import CALLER, OPEN, SCOPES, KeyCheck, scopes_for
from llmesh.v1 import (
    eval_pb2,
    eval_pb2_grpc,
    events_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    infer_pb2,
    infer_pb2_grpc,
    tokenize_pb2,
    tokenize_pb2_grpc,
)
from services.eval.app import EvalService
from services.eval.stats import GenerationStats

SECRETS = {"generate": [Scope.GENERATE], "read": [Scope.READ], "admin": [Scope.ADMIN], "all": list(Scope)}


def _key(name: str, scopes: list[Scope]) -> ApiKey:
    return ApiKey(id=f"id-{name}", name=name, scopes=scopes, digest="-", created_at=time.time())


class FakeKeys:
    """ApiKeyStore.find over a dict: secret `<name>` is key `id-<name>`."""

    def __init__(self) -> None:
        self.keys = {name: _key(name, scopes) for name, scopes in SECRETS.items()}
        self.lookups = 0

    async def find(self, secret: str) -> ApiKey | None:
        self.lookups += 1
        return self.keys.get(secret)


class Gateway(gateway_pb2_grpc.GatewayServicer):
    async def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse()

    async def GenerateStream(self, request, context):
        for _ in range(2):
            yield gateway_pb2.GenerateChunk(text=CALLER.get().id)


class Admin(gateway_pb2_grpc.AdminServicer):
    async def Rollback(self, request, context):
        return gateway_pb2.PublishReleaseResponse(model=CALLER.get().id)


class Tokenizer(tokenize_pb2_grpc.TokenizerServicer):
    async def CountTokens(self, request, context):
        return tokenize_pb2.CountTokensResponse(count=1)


class Infer(infer_pb2_grpc.InferServicer):
    async def ListLoaded(self, request, context):
        return infer_pb2.ListLoadedResponse(replica="r")


class NoModels:
    async def models(self) -> list[str]:
        return []


class NoTemplates:
    async def candidates(self) -> list[object]:
        return []


def _eval_service() -> EvalService:
    """EvalService's GetReport over known records, without its broker, Redis or embedder."""
    service = EvalService.__new__(EvalService)
    service.stats = GenerationStats()
    service.registry = NoModels()  # type: ignore[assignment]
    service.templates = NoTemplates()  # type: ignore[assignment]
    for n, (key_id, scenario) in enumerate((("id-read", "a"), ("id-read", "b"), ("id-generate", "a"), ("", "a"))):
        record = events_pb2.GenerationRecord(
            request_id=f"r{n}", model="chat", version=1, api_key_id=key_id, scenario=scenario, latency_ms=1
        )
        record.usage.prompt_tokens, record.usage.completion_tokens = 3, 5
        service.stats.add(record)
    return service


async def _serve(keys: FakeKeys | None) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[KeyCheck(keys)] if keys else [])
    gateway_pb2_grpc.add_GatewayServicer_to_server(Gateway(), server)
    gateway_pb2_grpc.add_AdminServicer_to_server(Admin(), server)
    tokenize_pb2_grpc.add_TokenizerServicer_to_server(Tokenizer(), server)
    infer_pb2_grpc.add_InferServicer_to_server(Infer(), server)
    eval_pb2_grpc.add_EvalServicer_to_server(_eval_service(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(["llmesh.v1.Gateway", health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
async def keys() -> FakeKeys:
    return FakeKeys()


@pytest.fixture
async def channel(keys: FakeKeys) -> AsyncIterator[grpc.aio.Channel]:
    server, channel = await _serve(keys)
    yield channel
    await channel.close()
    await server.stop(None)


def _calls(channel: grpc.aio.Channel) -> dict[str, object]:
    """One call of each service of the mesh, by the scope it needs."""
    return {
        "Gateway": lambda md: gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), metadata=md),
        "Admin": lambda md: gateway_pb2_grpc.AdminStub(channel).Rollback(gateway_pb2.RollbackRequest(), metadata=md),
        "Tokenizer": lambda md: tokenize_pb2_grpc.TokenizerStub(channel).CountTokens(tokenize_pb2.TokenizeRequest(), metadata=md),
        "Infer": lambda md: infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), metadata=md),
        "Eval": lambda md: eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(), metadata=md),
    }


ALLOWED = {  # key name -> the services it may call
    "generate": {"Gateway", "Tokenizer"},
    "read": {"Eval"},
    "admin": {"Admin", "Infer", "Eval"},
    "all": {"Gateway", "Tokenizer", "Eval", "Admin", "Infer"},
}


async def _code(call, metadata) -> tuple[grpc.StatusCode, str]:
    try:
        await call(metadata)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def test_every_service_refuses_a_call_without_a_live_key(channel):
    for service, call in _calls(channel).items():
        code, details = await _code(call, ())
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "an API key is required (x-api-key)"), service
        code, details = await _code(call, (("x-api-key", "not-a-key"),))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in details, service


async def test_each_scope_opens_its_services_only(channel):
    for name, allowed in ALLOWED.items():
        for service, call in _calls(channel).items():
            code, details = await _code(call, (("x-api-key", name),))
            if service in allowed:
                assert code == grpc.StatusCode.OK, (name, service, details)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (name, service)
                assert details.startswith(f"key id-{name} lacks the ")


async def test_a_bearer_token_works_and_the_handler_knows_its_caller(channel):
    stub = gateway_pb2_grpc.GatewayStub(channel)
    chunks = [
        c.text async for c in stub.GenerateStream(gateway_pb2.GenerateRequest(), metadata=(("authorization", "Bearer generate"),))
    ]
    assert chunks == ["id-generate", "id-generate"]
    reply = await gateway_pb2_grpc.AdminStub(channel).Rollback(gateway_pb2.RollbackRequest(), metadata=(("x-api-key", "admin"),))
    assert reply.model == "id-admin"


async def test_health_and_reflection_stay_open(channel):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await stream.read()
    await stream.done_writing()
    assert "llmesh.v1.Gateway" in [s.name for s in answer.list_services_response.service]


async def test_a_key_is_looked_up_once_per_cache_period(channel, keys):
    call = _calls(channel)["Tokenizer"]
    for _ in range(3):
        assert (await _code(call, (("x-api-key", "generate"),)))[0] == grpc.StatusCode.OK
    assert keys.lookups == 1


def test_every_service_of_the_mesh_has_its_scopes_and_anything_else_needs_admin():
    for module in ("gateway", "tokenize", "infer", "eval"):
        descriptor = importlib.import_module(f"llmesh.v1.{module}_pb2").DESCRIPTOR
        for service in descriptor.services_by_name.values():
            assert f"/{service.full_name}/" in SCOPES, service.full_name
    assert scopes_for("/llmesh.v1.Tokenizer/CountTokens") == (Scope.GENERATE,)
    assert scopes_for("/llmesh.v1.Infer/ListLoaded") == (Scope.ADMIN,)
    assert scopes_for("/llmesh.v1.Future/Anything") == (Scope.ADMIN,)  # deny by default
    assert scopes_for("/other.Service/Method") == (Scope.ADMIN,)
    assert scopes_for("/grpc.health.v1.Health/Check") == scopes_for("/grpc.health.v1.Health/Watch") == ()
    assert all(scopes_for(prefix + "Method") == () for prefix in OPEN)


async def _usage(channel: grpc.aio.Channel, metadata) -> list[tuple[str, str]]:
    report = await eval_pb2_grpc.EvalStub(channel).GetReport(eval_pb2.GetReportRequest(), metadata=metadata)
    assert [v.requests for v in report.versions] == [4], "the versions' aggregates are not filtered"
    return [(row.api_key_id, row.scenario) for row in report.usage]


async def test_the_report_shows_every_keys_usage_to_an_admin_key_only(channel):
    everyone = [("", "a"), ("id-generate", "a"), ("id-read", "a"), ("id-read", "b")]
    assert await _usage(channel, (("x-api-key", "admin"),)) == everyone
    assert await _usage(channel, (("x-api-key", "all"),)) == everyone
    assert await _usage(channel, (("x-api-key", "read"),)) == [("id-read", "a"), ("id-read", "b")]


async def test_without_keys_required_the_report_is_as_before():
    server, channel = await _serve(None)
    try:
        assert len(await _usage(channel, ())) == 4
    finally:
        await channel.close()
        await server.stop(None)


@pytest.mark.parametrize("name", ["gateway", "tokenize", "infer", "eval"])
def test_every_service_checks_keys_when_the_environment_requires_them(name, tmp_path, monkeypatch):
    from llmesh.common.settings import load_settings

    app = importlib.import_module(f"services.{name}.app")
    service_cls = next(
        v for v in vars(app).values() if isinstance(v, type) and v.__module__ == app.__name__ and hasattr(v, "interceptors")
    )
    settings_cls = next(v for k, v in vars(app).items() if k.endswith("Settings") and isinstance(v, type))
    monkeypatch.setenv("LLMESH_MODEL_REPOSITORY", str(tmp_path / "repository"))
    monkeypatch.setenv("LLMESH_MODEL_STORE", str(tmp_path / "store"))
    assert service_cls(load_settings(settings_cls, [], name)).interceptors() == []
    monkeypatch.setenv("LLMESH_API_KEYS_REQUIRED", "true")
    (check,) = service_cls(load_settings(settings_cls, [], name)).interceptors()
    assert isinstance(check, KeyCheck)
