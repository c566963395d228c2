"""Backtest gates: promptfoo-style assertions per case, a pass rate, and thresholds that fail a pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmesh.backtest import Assertion, Case, CaseResult, Target, gate, load_cases, parse_threshold, summary
from llmesh.v1 import common_pb2


@pytest.mark.parametrize(
    ("kind", "value", "answer", "holds"),
    [
        ("contains", "pickle", "the pickle module", True),
        ("contains", "Pickle", "the pickle module", False),
        ("icontains", "Pickle", "the pickle module", True),
        ("equals", "the pickle module.", "  the pickle module.\n", True),
        ("regex", r"^\d+ items$", "42 items", True),
        ("regex", r"^\d+ items$", "many items", False),
        ("is-json", "", '{"a": [1, 2]}', True),
        ("is-json", "", "{a: 1}", False),
        ("not-contains", "password", "the pickle module", True),
        ("not-is-json", "", "plain text", True),
    ],
)
def test_each_assertion(kind, value, answer, holds):
    assert Assertion(type=kind, value=value).holds(answer) is holds


@given(st.text(max_size=40), st.text(max_size=40))
def test_not_is_always_the_opposite(value, answer):
    for kind in ("contains", "icontains", "equals", "is-json"):
        assert Assertion(type=f"not-{kind}", value=value).holds(answer) != Assertion(type=kind, value=value).holds(answer)


def test_a_case_file_with_a_bad_assertion_is_refused_naming_the_line(tmp_path: Path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "assert": [{"type": "contains", "value": "y"}]}\n\n')
    assert load_cases(path)[0].assertions == [Assertion(type="contains", value="y")]
    for bad, why in (
        ('{"type": "startswith", "value": "y"}', "unknown assertion 'startswith'"),
        ('{"type": "regex", "value": "("}', "regex '\\('"),
    ):
        path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "x", "assert": [' + bad + "]}\n")
        with pytest.raises(ValueError, match=f"cases.jsonl line 2: .*{why}"):
            load_cases(path)


def _result(failed: list[str], asserted: bool = True, rouge: float = 0.5) -> CaseResult:
    return CaseResult("c", 2, "answer", "", 0.0, rouge, 0.0, None, 0, failed, asserted)


def test_the_pass_rate_counts_only_cases_with_assertions():
    results = [_result([]), _result(["contains 'x'"]), _result([]), _result([], asserted=False)]
    figures = summary(results)
    assert (figures["asserted"], figures["pass_rate"]) == (3, 2 / 3)
    assert summary([_result([], asserted=False)])["pass_rate"] == 0.0


def test_thresholds_parse_and_gate():
    assert parse_threshold("rouge_l=0.3") == ("rouge_l", 0.3)
    for bad in ("rouge_l", "bleu=0.3", "rouge_l=high"):
        with pytest.raises(ValueError, match=r"rouge_l|METRIC=VALUE"):
            parse_threshold(bad)
    figures = summary([_result([], rouge=0.25), _result(["equals 'x'"], rouge=0.35)])
    assert gate(figures, {"rouge_l": 0.3}) == []
    assert gate(figures, {"rouge_l": 0.31, "pass_rate": 0.5}) == ["rouge_l 0.300 < 0.31"]
    assert gate(figures, {"pass_rate": 0.9}) == ["pass_rate 0.500 < 0.9"]


def test_a_case_reads_assert_as_promptfoo_writes_it():
    case = Case.model_validate({"id": "a", "prompt": "p", "assert": [{"type": "is-json"}]})
    assert str(case.assertions[0]) == "is-json"


def test_a_scenario_backtest_pins_the_template_version_and_needs_variables():
    cases = [Case(id="a", variables={"question": "why?", "words": 3}, expected="x")]
    target = Target(2, scenario="support")
    target.check(cases)
    request = target.request(cases[0], common_pb2.SamplingParams(max_tokens=4))
    assert (request.scenario, request.model, request.prompt) == ("support@2", "", "")
    assert dict(request.variables) == {"question": "why?", "words": 3.0}
    assert str(target) == "support template v2"
    with pytest.raises(ValueError, match="case p: a scenario's template renders the prompt"):
        target.check([Case(id="p", prompt="hello")])
    with pytest.raises(ValueError, match="case a: no prompt"):
        Target(1, model="chat").check(cases)
    assert Target(1, model="chat").request(Case(id="p", prompt="hi"), common_pb2.SamplingParams()).model == "chat@1"
