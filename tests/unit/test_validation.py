import pytest

from llmesh.v1 import common_pb2, gateway_pb2
from services.gateway.settings import GatewaySettings
from services.gateway.validation import InvalidRequest, resolve_sampling, validate_prompt

SETTINGS = GatewaySettings(max_prompt_chars=100, max_tokens_limit=64, default_max_tokens=16)


def test_defaults_fill_unset_fields():
    resolved = resolve_sampling(common_pb2.SamplingParams(seed=5), SETTINGS)
    assert (resolved.max_tokens, resolved.temperature, resolved.top_p, resolved.seed) == (16, 1.0, 1.0, 5)


def test_zero_temperature_is_greedy_not_unset():
    assert resolve_sampling(common_pb2.SamplingParams(temperature=0.0), SETTINGS).temperature == 0.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (common_pb2.SamplingParams(max_tokens=0), "max_tokens must be between 1 and 64"),
        (common_pb2.SamplingParams(max_tokens=65), "max_tokens must be between 1 and 64"),
        (common_pb2.SamplingParams(temperature=-0.5), "temperature must be between 0"),
        (common_pb2.SamplingParams(temperature=float("nan")), "temperature must be between 0"),
        (common_pb2.SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
        (common_pb2.SamplingParams(top_p=1.5), "top_p must be in (0, 1]"),
        (common_pb2.SamplingParams(stop=["a", "b", "c", "d", "e"]), "at most 4 stop strings"),
        (common_pb2.SamplingParams(stop=[""]), "each stop string must have 1 to"),
    ],
)
def test_bad_sampling_is_refused_with_the_field_named(params, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace("]", r"\]")):
        resolve_sampling(params, SETTINGS)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (gateway_pb2.GenerateRequest(prompt="hi"), "model is required"),
        (gateway_pb2.GenerateRequest(model="chat", prompt="   "), "prompt must not be empty"),
        (gateway_pb2.GenerateRequest(model="chat", prompt="x" * 101), "prompt is 101 characters; the limit is 100"),
    ],
)
def test_bad_prompt_is_refused(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        validate_prompt(request_, SETTINGS)
