"""Bad input, tried systematically (hypothesis): whatever arrives, the edges answer with a clear
refusal of their own type, never another exception, and what they accept is within bounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmesh.common import topics
from llmesh.common.events import InvalidEvent, ReleaseEvent, artifact_digests
from llmesh.common.validation import (
    MAX_MESSAGE_CHARS,
    MAX_VERSION,
    SAMPLING_EPS,
    InvalidRequest,
    RequestLimits,
    check_resolved,
    parse_model_ref,
    resolve_sampling,
    sampling_from_values,
    validate_request,
)
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2
from services.gateway.settings import GatewaySettings
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


# ---- client requests: the one validation of every entry (llmesh/common/validation.py) -------------

FLOATS32 = st.floats(width=32) | st.sampled_from([math.nan, math.inf, -math.inf, 1e-40, -1e-40, 1e-5, -0.0, 2.0, 1.0])
TEXT = st.text(max_size=100) | st.text(alphabet=st.characters(codec="utf-8"), min_size=60, max_size=300)
LONG_TEXT = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(0, 100_000))


def _within_bounds(resolved: events_pb2.ResolvedSampling, limits: RequestLimits) -> None:
    assert 1 <= resolved.max_tokens <= limits.max_tokens_limit
    assert resolved.temperature == 0.0 or SAMPLING_EPS <= resolved.temperature <= 2.0
    assert 0.0 < resolved.top_p <= 1.0
    assert 0 <= resolved.seed <= 2**64 - 1
    assert len(resolved.stop) <= limits.max_stop_strings
    assert all(1 <= len(s) <= limits.max_stop_chars for s in resolved.stop)


def _refused_in_bounds(err: InvalidRequest) -> None:
    message = str(err)
    assert message and len(message) <= MAX_MESSAGE_CHARS
    message.encode("utf-8")  # carried by gRPC and protobuf as it is


@given(
    max_tokens=st.none() | st.integers(0, 2**32 - 1),
    temperature=st.none() | FLOATS32,
    top_p=st.none() | FLOATS32,
    stop=st.lists(TEXT | LONG_TEXT, max_size=8),
    seed=st.none() | st.integers(0, 2**64 - 1),
)
@settings(deadline=None)
def test_any_sampling_is_resolved_within_bounds_or_refused(max_tokens, temperature, top_p, stop, seed) -> None:
    fields = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    params = common_pb2.SamplingParams(stop=stop, **{k: v for k, v in fields.items() if v is not None})
    try:
        resolved = resolve_sampling(params, GATEWAY)
    except InvalidRequest as err:
        _refused_in_bounds(err)
        assert "sampling." in str(err)
        return
    _within_bounds(resolved, GATEWAY)
    if temperature is not None and temperature < SAMPLING_EPS:
        assert resolved.temperature == 0.0  # greedy, as vLLM: never a subnormal temperature for Triton


SURROGATES = st.text(alphabet=st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=10)  # not UTF-8
ANY_NUMBER = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | st.just([1])


@given(
    max_tokens=ANY_NUMBER,
    temperature=ANY_NUMBER,
    top_p=ANY_NUMBER,
    seed=ANY_NUMBER,
    stop=st.lists(TEXT | SURROGATES, max_size=6) | st.text(max_size=5) | st.none() | st.lists(st.integers(), max_size=2),
)
def test_any_plain_values_are_resolved_within_bounds_or_refused(max_tokens, temperature, top_p, seed, stop) -> None:
    """What a later entry (JSON over HTTP) may hand over: ints of every size, floats, wrong types."""
    try:
        resolved = sampling_from_values(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, limits=GATEWAY
        )
    except InvalidRequest as err:
        _refused_in_bounds(err)
        return
    _within_bounds(resolved, GATEWAY)


@given(
    max_tokens=st.integers(0, 2**32 - 1),
    temperature=FLOATS32,
    top_p=FLOATS32,
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(TEXT, max_size=6),
)
def test_any_kafka_sampling_is_within_bounds_or_refused(max_tokens, temperature, top_p, seed, stop) -> None:
    sampling = events_pb2.ResolvedSampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    try:
        resolved = check_resolved(sampling, GATEWAY)
    except InvalidRequest as err:
        _refused_in_bounds(err)
        return
    _within_bounds(resolved, GATEWAY)
    assert resolved.seed == seed  # a Kafka client's seed is kept, whatever uint64


ASCII_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=12)
MODEL_REFS = (
    st.text(max_size=80)
    | st.builds("{}@{}".format, st.sampled_from(["chat", "c", "a-b_9"]), ASCII_DIGITS | st.text(max_size=12))
    | st.builds("chat@{}".format, st.integers(-(2**40), 2**40))
    | LONG_TEXT
)


@given(MODEL_REFS)
@settings(deadline=None)
def test_model_references_parse_or_are_refused_in_bounds(text: str) -> None:
    try:
        name, version = parse_model_ref(text)
    except InvalidRequest as err:
        _refused_in_bounds(err)
        assert len(str(err)) < 300  # the client's text is echoed cut
        return
    assert "@" not in name and 1 <= len(name) <= 63
    pinned = text.partition("@")[2]
    if version is None:
        assert "@" not in text
    else:  # exactly ASCII digits, 1..MAX_VERSION
        assert pinned.isascii() and pinned.isdigit() and int(pinned) == version and 1 <= version <= MAX_VERSION


@given(ASCII_DIGITS)
def test_every_ascii_digit_version_in_range_is_accepted(digits: str) -> None:
    value = int(digits)
    try:
        assert parse_model_ref(f"chat@{digits}") == ("chat", value)
    except InvalidRequest:
        assert not 1 <= value <= MAX_VERSION


@given(model=st.text(max_size=40) | LONG_TEXT, prompt=TEXT | LONG_TEXT | st.just("x" * (GATEWAY.max_prompt_chars + 1)))
@settings(deadline=None)
def test_any_request_is_accepted_or_refused_with_a_bounded_reason(model: str, prompt: str) -> None:
    try:
        validate_request(gateway_pb2.GenerateRequest(model=model, prompt=prompt), GATEWAY)
    except InvalidRequest as err:
        _refused_in_bounds(err)
        return
    assert model and prompt.strip() and len(prompt) <= GATEWAY.max_prompt_chars
