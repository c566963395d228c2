"""The one validation of client requests (llmesh/common/validation.py), by example: every case a
client hit, before the checks were shared, as a test."""

import math
import re

import pytest

from llmesh.common.validation import (
    MAX_MESSAGE_CHARS,
    SAMPLING_EPS,
    InvalidRequest,
    RequestLimits,
    bounded,
    check_resolved,
    parse_model_ref,
    resolve_sampling,
    sampling_from_values,
    shown,
    validate_prompt,
    validate_request,
    validate_task,
    validate_tokenize,
)
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2, tokenize_pb2
from services.gateway.settings import GatewaySettings
from services.tokenize.settings import TokenizeSettings

SETTINGS = GatewaySettings(max_prompt_chars=100, max_tokens_limit=64, default_max_tokens=16)
LIMITS = RequestLimits()
HUGE = "x" * 100_000


def test_defaults_fill_unset_fields():
    resolved = resolve_sampling(common_pb2.SamplingParams(seed=5), SETTINGS)
    assert (resolved.max_tokens, resolved.temperature, resolved.top_p, resolved.seed) == (16, 1.0, 1.0, 5)


def test_zero_temperature_is_greedy_not_unset():
    assert resolve_sampling(common_pb2.SamplingParams(temperature=0.0), SETTINGS).temperature == 0.0


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6, 1e-5, -0.0])  # 1e-5 as float32 is just below 1e-5
def test_temperatures_below_the_epsilon_are_greedy(temperature):
    """Before: 1e-40 passed and Triton failed with 'probability tensor contains inf/nan'."""
    assert resolve_sampling(common_pb2.SamplingParams(temperature=temperature), SETTINGS).temperature == 0.0


def test_temperatures_from_the_epsilon_up_are_kept():
    assert resolve_sampling(common_pb2.SamplingParams(temperature=1.01e-5), SETTINGS).temperature >= SAMPLING_EPS
    assert resolve_sampling(common_pb2.SamplingParams(temperature=2.0), SETTINGS).temperature == 2.0


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_any_uint64_seed_is_kept(seed):
    assert resolve_sampling(common_pb2.SamplingParams(seed=seed), SETTINGS).seed == seed


def test_an_unset_seed_is_random():
    assert len({resolve_sampling(common_pb2.SamplingParams(), SETTINGS).seed for _ in range(8)}) > 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (common_pb2.SamplingParams(max_tokens=0), "sampling.max_tokens must be between 1 and 64, got 0"),
        (common_pb2.SamplingParams(max_tokens=65), "sampling.max_tokens must be between 1 and 64, got 65"),
        (common_pb2.SamplingParams(max_tokens=2**32 - 1), "sampling.max_tokens must be between 1 and 64"),
        (common_pb2.SamplingParams(temperature=-0.5), "sampling.temperature must be between 0"),
        (common_pb2.SamplingParams(temperature=2.5), "sampling.temperature must be between 0"),
        (common_pb2.SamplingParams(temperature=float("nan")), "sampling.temperature must be between 0 (greedy) and 2, got nan"),
        (common_pb2.SamplingParams(temperature=float("inf")), "sampling.temperature must be between 0"),
        (common_pb2.SamplingParams(temperature=-1e-40), "sampling.temperature must be between 0"),
        (common_pb2.SamplingParams(top_p=0.0), "sampling.top_p must be in (0, 1]"),
        (common_pb2.SamplingParams(top_p=-0.1), "sampling.top_p must be in (0, 1]"),
        (common_pb2.SamplingParams(top_p=1.5), "sampling.top_p must be in (0, 1]"),
        (common_pb2.SamplingParams(top_p=float("nan")), "sampling.top_p must be in (0, 1], got nan"),
        (common_pb2.SamplingParams(top_p=float("-inf")), "sampling.top_p must be in (0, 1]"),
        (common_pb2.SamplingParams(stop=["a", "b", "c", "d", "e"]), "sampling.stop: at most 4 stop strings, got 5"),
        (common_pb2.SamplingParams(stop=[""]), "each stop string must have 1 to 64 characters"),
        (common_pb2.SamplingParams(stop=["x" * 65]), "each stop string must have 1 to 64 characters"),
    ],
)
def test_bad_sampling_is_refused_with_the_field_named(params, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        resolve_sampling(params, SETTINGS)


def test_stop_strings_at_the_limits_are_kept():
    stop = ["\x00", "x" * 64, "é", "\n"]
    assert list(resolve_sampling(common_pb2.SamplingParams(stop=stop), SETTINGS).stop) == stop


@pytest.mark.parametrize(
    ("values", "message"),
    [  # what a later entry (JSON over HTTP) may hand over: any Python value
        ({"max_tokens": 10**400}, "sampling.max_tokens"),
        ({"max_tokens": True}, "sampling.max_tokens"),
        ({"max_tokens": 5.0}, "sampling.max_tokens"),
        ({"temperature": 10**400}, "sampling.temperature"),
        ({"temperature": "0.5"}, "sampling.temperature"),
        ({"top_p": None}, "sampling.top_p"),
        ({"seed": -1}, "sampling.seed"),
        ({"seed": 2**64}, "sampling.seed"),
        ({"stop": "abc"}, "sampling.stop must be a list"),
        ({"stop": ["\ud800"]}, "sampling.stop"),
        ({"stop": [1]}, "sampling.stop"),
    ],
)
def test_plain_values_of_any_type_are_refused_not_raised(values, message):
    fields = {"max_tokens": 8, "temperature": 0.5, "top_p": 1.0, "seed": 1, "stop": [], **values}
    with pytest.raises(InvalidRequest, match=re.escape(message)) as refused:
        sampling_from_values(**fields, limits=LIMITS)
    assert len(str(refused.value)) <= MAX_MESSAGE_CHARS


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (gateway_pb2.GenerateRequest(prompt="hi"), "model is required"),
        (gateway_pb2.GenerateRequest(model="chat", prompt=""), "prompt must not be empty"),
        (gateway_pb2.GenerateRequest(model="chat", prompt="   "), "prompt must not be empty"),
        (gateway_pb2.GenerateRequest(model="chat", prompt="\n\t\u3000\u2028"), "prompt must not be empty"),
        (gateway_pb2.GenerateRequest(model="chat", prompt="x" * 101), "prompt is 101 characters; the limit is 100"),
        (
            gateway_pb2.GenerateRequest(model="chat@", prompt="hi"),
            "model must be NAME or NAME@VERSION (VERSION a positive integer)",
        ),
    ],
)
def test_bad_request_is_refused(request_, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        validate_request(request_, SETTINGS)


def test_a_prompt_with_nul_is_text():
    validate_prompt("a\x00b", SETTINGS)


def test_a_lone_surrogate_is_refused_not_raised():
    """Protobuf strings are UTF-8 (it refuses to carry one); a later entry may hand one over."""
    with pytest.raises(InvalidRequest, match="prompt must be valid UTF-8 text"):
        validate_prompt("a\ud800b", SETTINGS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chat", ("chat", None)),
        ("chat@2", ("chat", 2)),
        ("chat@02", ("chat", 2)),
        ("chat-v2_x@2147483647", ("chat-v2_x", 2147483647)),
        ("c" * 63, ("c" * 63, None)),
    ],
)
def test_model_references_accepted(text, expected):
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "chat@",  # before: the primary
        "chat@x",
        "chat@0",
        "chat@00",
        "chat@²",  # before: UNKNOWN with a Python exception (str.isdigit takes '²', int() does not)
        "chat@\u0661",  # before: version 1 (int() takes Arabic-Indic digits)
        "chat@ 1",
        "chat@+1",
        "chat@-1",
        "chat@1_0",
        "chat@1@2",
        "chat@1\n",
        "chat@2147483648",
        "chat@" + "9" * 5000,  # int() refuses over 4300 digits
        "@1",
        "@",
    ],
)
def test_bad_versions_are_refused(text):
    with pytest.raises(InvalidRequest, match=re.escape("model must be NAME or NAME@VERSION (VERSION a positive integer)")):
        parse_model_ref(text)


@pytest.mark.parametrize("text", ["Chat", "chat ", " chat", "chat\n", "9chat", "ch/at", "ch:at", "c" * 64, "chät", HUGE, "\x00"])
def test_bad_model_names_are_refused(text):
    with pytest.raises(InvalidRequest, match="NAME is a lowercase letter") as refused:
        parse_model_ref(text)
    assert len(str(refused.value)) < 300


def test_a_100kb_model_name_is_refused_with_a_short_message():
    """Before: echoed whole into the gRPC status, past gRPC's metadata limit."""
    with pytest.raises(InvalidRequest) as refused:
        validate_request(gateway_pb2.GenerateRequest(model=HUGE, prompt="hi"), SETTINGS)
    message = str(refused.value)
    assert len(message) < 300 and "…" in message and "x" * 65 not in message


def test_shown_cuts_any_value():
    assert shown("chat") == "'chat'"
    assert shown("x" * 100) == "'" + "x" * 63 + "…"
    assert shown(10**5000).startswith("<an integer of")  # repr refuses ints over 4300 digits
    assert shown(float("nan")) == "nan"
    assert len(shown("\x00" * 1000)) <= 65


def test_bounded_cuts_messages_and_lone_surrogates():
    assert bounded("x" * 5000) == "x" * (MAX_MESSAGE_CHARS - 1) + "…"
    assert bounded("a\ud800b").encode() == b"a\\ud800b"
    assert len(str(InvalidRequest("y" * 10_000))) == MAX_MESSAGE_CHARS


# ---- the Kafka entry (GenerateTask): sampling is resolved by the client, every field counts ----------

GOOD = events_pb2.ResolvedSampling(max_tokens=8, temperature=0.7, top_p=1.0, seed=5)


def _task(**fields) -> events_pb2.GenerateTask:
    base = {"request_id": "r1", "model": "chat", "version": 1, "prompt": "Return", "sampling": GOOD}
    return events_pb2.GenerateTask(**{**base, **fields})


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (_task(sampling=events_pb2.ResolvedSampling(max_tokens=0, temperature=0.7, top_p=1.0)), "sampling.max_tokens"),
        (_task(sampling=events_pb2.ResolvedSampling(max_tokens=8, temperature=math.nan, top_p=1.0)), "sampling.temperature"),
        (_task(sampling=events_pb2.ResolvedSampling(max_tokens=8, temperature=0.7, top_p=0.0)), "sampling.top_p"),
        (_task(sampling=events_pb2.ResolvedSampling(max_tokens=9999, temperature=0.7, top_p=1.0)), "sampling.max_tokens"),
        (_task(sampling=events_pb2.ResolvedSampling(max_tokens=8, top_p=1.0, stop=[""])), "sampling.stop"),
        (_task(prompt=" "), "prompt must not be empty"),
        (_task(prompt="x" * 8193), "prompt is 8193 characters"),
        (_task(model="Chat"), "model name must be"),
        (_task(model=HUGE), "model name must be"),
        (_task(version=2**31), "version must be a positive integer"),
        (_task(sampling=None), "sampling.max_tokens"),  # no sampling at all: nothing to generate
    ],
)
def test_bad_generate_tasks_are_refused(task, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)) as refused:
        validate_task(task, TokenizeSettings())
    assert len(str(refused.value)) < 300


def test_a_generate_task_gets_its_sampling_normalised():
    sampling = events_pb2.ResolvedSampling(max_tokens=8, temperature=1e-40, top_p=1.0, seed=2**64 - 1)
    resolved = validate_task(_task(sampling=sampling), TokenizeSettings())
    assert (resolved.temperature, resolved.seed, resolved.max_tokens) == (0.0, 2**64 - 1, 8)
    assert check_resolved(GOOD, LIMITS) == GOOD


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (tokenize_pb2.TokenizeRequest(text="hi"), "model is required"),
        (tokenize_pb2.TokenizeRequest(model=HUGE, text="hi"), "model name must be"),
        (tokenize_pb2.TokenizeRequest(model="chat", version=2**32 - 1, text="hi"), "version must be"),
        (tokenize_pb2.TokenizeRequest(model="chat", text="x" * 8193), "text is 8193 characters; the limit is 8192"),
    ],
)
def test_bad_tokenize_requests_are_refused(request_, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        validate_tokenize(request_, TokenizeSettings())


def test_empty_text_may_be_tokenized_and_version_0_is_the_primary():
    validate_tokenize(tokenize_pb2.TokenizeRequest(model="chat", text=""), TokenizeSettings())


def test_both_services_read_the_same_limits_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMESH_MAX_TOKENS_LIMIT", "77")
    monkeypatch.setenv("LLMESH_MAX_PROMPT_CHARS", "300")
    for settings in (GatewaySettings(), TokenizeSettings()):
        assert (settings.max_tokens_limit, settings.max_prompt_chars) == (77, 300)


def test_inconsistent_limits_are_refused_at_start():
    with pytest.raises(ValueError, match="default_max_tokens"):
        RequestLimits(default_max_tokens=100, max_tokens_limit=10)
    with pytest.raises(ValueError, match="default_top_p"):
        RequestLimits(default_top_p=0.0)
