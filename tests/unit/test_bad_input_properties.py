"""Bad input, tried systematically (hypothesis): whatever arrives, the edges answer with a clear
refusal of their own type, never another exception, and what they accept is within bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmesh.common import topics
from llmesh.common.events import InvalidEvent, ReleaseEvent, artifact_digests
from llmesh.v1 import common_pb2, gateway_pb2
from services.gateway.settings import GatewaySettings
from services.gateway.validation import InvalidRequest, resolve_sampling, validate_prompt
from services.infer.repository import verify_release

GATEWAY = GatewaySettings()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=20,
)
RELEASE_FIELDS = ["event_id", "model", "version", "label", "artifact_uri", "sha256", "mode", "share_percent", "author"]


def _parse_or_refuse(payload: bytes, content_type: str) -> ReleaseEvent | None:
    try:
        return ReleaseEvent.parse(payload, content_type)
    except InvalidEvent as err:
        assert str(err), "a refusal names its reason"
        return None


@given(st.binary(max_size=2048), st.sampled_from([topics.CONTENT_TYPE_JSON, topics.CONTENT_TYPE_PROTOBUF]))
def test_any_bytes_are_a_release_event_or_a_reasoned_refusal(payload: bytes, content_type: str) -> None:
    _parse_or_refuse(payload, content_type)


@given(st.dictionaries(st.sampled_from(RELEASE_FIELDS) | st.text(max_size=12), JSON_VALUES, max_size=10))
def test_any_json_object_is_a_valid_release_event_or_refused(fields: dict[str, object]) -> None:
    event = _parse_or_refuse(json.dumps(fields).encode(), topics.CONTENT_TYPE_JSON)
    if event is not None:  # then it is within every bound
        assert set(fields) <= set(ReleaseEvent.model_fields), "unknown fields are refused"
        assert event.version >= 1 and 0 <= event.share_percent <= 100 and len(event.sha256) <= 256


@given(st.sampled_from(["model", "artifact_uri", "reason", "label", "author", "event_id"]), st.integers(5_000, 2_000_000))
@settings(max_examples=20, deadline=None)
def test_huge_fields_are_refused(field: str, size: int) -> None:
    fields: dict[str, object] = {"model": "chat", "version": 1, "artifact_uri": "/m", field: "x" * size}
    assert _parse_or_refuse(json.dumps(fields).encode(), topics.CONTENT_TYPE_JSON) is None


@given(st.integers(257, 2000))
@settings(max_examples=5, deadline=None)
def test_too_many_artifact_files_are_refused(count: int) -> None:
    sha = {f"f{i}": "a" * 64 for i in range(count)}
    payload = json.dumps({"model": "chat", "version": 1, "artifact_uri": "/m", "sha256": sha}).encode()
    assert _parse_or_refuse(payload, topics.CONTENT_TYPE_JSON) is None


@given(st.lists(st.sampled_from(["..", ".", "models", "chat", "", "etc"]), min_size=1, max_size=6), st.booleans())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_artifact_paths_cannot_escape_the_model_store(tmp_path: Path, parts: list[str], as_uri: bool) -> None:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    target = str(store) + "/" + "/".join(parts)
    uri = f"file://{target}" if as_uri else target
    event = ReleaseEvent(model="chat", version=1, artifact_uri=uri, sha256={})
    try:
        verify_release(event, roots=[store])
    except InvalidEvent as err:
        if ".." in parts:
            assert "'..'" in str(err)
        return
    pytest.fail("an empty or missing artifact directory was accepted")


def test_relative_absolute_elsewhere_and_symlinked_stores_are_refused(tmp_path: Path) -> None:
    store, elsewhere, inside = tmp_path / "store", tmp_path / "elsewhere", tmp_path / "store" / "chat-v1"
    for d in (store, elsewhere, inside):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "tokenizer.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"\0" * 8)
    (store / "link").symlink_to(elsewhere, target_is_directory=True)
    for uri, reason in [
        ("models/chat", "absolute"),
        (str(elsewhere), "outside the model store"),
        (str(store / "link"), "outside the model store"),  # a symlink out of the store
    ]:
        event = ReleaseEvent(model="chat", version=1, artifact_uri=uri, sha256=artifact_digests(elsewhere))
        with pytest.raises(InvalidEvent, match=reason):
            verify_release(event, roots=[store])
    accepted = ReleaseEvent(model="chat", version=1, artifact_uri=inside.as_uri(), sha256=artifact_digests(inside))
    assert set(verify_release(accepted, roots=[store])) == {"config.json", "tokenizer.json", "model.safetensors"}


@given(
    max_tokens=st.none() | st.integers(0, 2**32 - 1),
    temperature=st.none() | st.floats(width=32),
    top_p=st.none() | st.floats(width=32),
    stop=st.lists(st.text(max_size=100), max_size=8),
    seed=st.none() | st.integers(0, 2**64 - 1),
)
def test_any_sampling_is_resolved_within_bounds_or_refused(max_tokens, temperature, top_p, stop, seed) -> None:
    fields = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    params = common_pb2.SamplingParams(stop=stop, **{k: v for k, v in fields.items() if v is not None})
    try:
        resolved = resolve_sampling(params, GATEWAY)
    except InvalidRequest as err:
        assert "sampling" in str(err) or "stop" in str(err)
        return
    assert 1 <= resolved.max_tokens <= GATEWAY.max_tokens_limit
    assert 0 <= resolved.temperature <= 2 and 0 < resolved.top_p <= 1
    assert len(resolved.stop) <= GATEWAY.max_stop_strings


@given(model=st.text(max_size=40), prompt=st.text(max_size=200) | st.just("x" * (GATEWAY.max_prompt_chars + 1)))
def test_any_prompt_is_accepted_or_refused_with_a_reason(model: str, prompt: str) -> None:
    try:
        validate_prompt(gateway_pb2.GenerateRequest(model=model, prompt=prompt), GATEWAY)
    except InvalidRequest as err:
        assert str(err)
        return
    assert model and prompt.strip() and len(prompt) <= GATEWAY.max_prompt_chars
