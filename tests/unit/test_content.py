"""Sensitive content rules: whole words and patterns found in prompts and in streamed answers however
the answer is split into chunks, redacted or refused by list, reloaded from the file without restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from llmesh.common import content
from llmesh.common.content import MASK, AnswerFilter, ContentAction, ContentList, ContentRules, ContentWatch, Scanner

RULES = """
lists:
  - {name: secrets, action: refuse, words: [password]}
  - {name: pii, action: redact, words: [ssn], patterns: ['\\b\\d{3}-\\d{2}-\\d{4}\\b']}
  - {name: brands, action: count, words: [acme], models: [chat], scenarios: [support]}
holdback_chars: 16
"""


def _scanner(tmp_path: Path, model: str = "chat", scenario: str = "support") -> Scanner:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    scanner = ContentWatch(path).scanner(model, scenario)
    assert scanner is not None
    return scanner


def test_words_are_whole_and_any_case_patterns_as_written(tmp_path: Path):
    scanner = _scanner(tmp_path)
    text, hits = scanner.scan("My SSN is 123-45-6789, not my Password or the passwords of ACME.")
    assert text == f"My {MASK} is {MASK}, not my Password or the passwords of ACME."
    assert sorted(h.list for h in hits) == ["brands", "pii", "pii", "secrets"], "passwords is another word"
    assert scanner.refusal(hits) == "the secrets content list refuses"
    assert scanner.scan("nothing here")[1] == []


def test_lists_apply_to_their_models_and_scenarios(tmp_path: Path):
    assert [c.name for c, _ in _scanner(tmp_path, "chat", "support").lists] == ["secrets", "pii", "brands"]
    assert [c.name for c, _ in _scanner(tmp_path, "other", "support").lists] == ["secrets", "pii"]
    scanner = _scanner(tmp_path, "chat", "")
    assert scanner.scenario_label("support") == "" and _scanner(tmp_path).scenario_label("support") == "support"
    assert scanner.scenario_label("made-up-by-a-client") == ""


@given(pieces=st.lists(st.text(alphabet="abcdefssnpaswordme -123456789", max_size=12), max_size=30))
def test_a_streamed_answer_is_filtered_exactly_as_the_whole_answer(pieces):
    scanner = Scanner(tuple((c, c.regex()) for c in ContentRules.model_validate(yaml.safe_load(RULES)).lists), 16)
    whole, whole_hits = scanner.scan("".join(pieces))
    stream = AnswerFilter(scanner)
    out = "".join(stream.feed(piece) for piece in pieces) + stream.finish()
    assert out == whole
    assert sorted(h.list for h in stream.hits) == sorted(h.list for h in whole_hits)


def test_a_word_split_across_chunks_is_redacted_and_counted_once(tmp_path: Path):
    stream = AnswerFilter(_scanner(tmp_path))
    out = [stream.feed(chunk) for chunk in ("the number is 123-4", "5-6789 and the ", "s", "sn too", " " * 40)]
    out.append(stream.finish())
    assert "".join(out) == f"the number is {MASK} and the {MASK} too" + " " * 40
    assert [h.list for h in stream.hits] == ["pii", "pii"]
    assert out[0] == "the", "the last 16 characters are held back: they could still become a match"


def test_a_bad_list_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="pattern '\\(': "):
        ContentList(name="x", patterns=["("])
    with pytest.raises(ValueError, match="neither words nor patterns"):
        ContentList(name="x")
    with pytest.raises(ValueError, match="distinct"):
        ContentRules(lists=[ContentList(name="x", words=["a"]), ContentList(name="x", words=["b"])])


def test_the_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_rules(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(content, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "rules.yaml"
    path.write_text("lists: [{name: a, action: refuse, words: [alpha]}]\n")
    watch = ContentWatch(path)
    assert watch.scanner("chat", "").lists[0][0].action is ContentAction.REFUSE  # type: ignore[union-attr]
    path.write_text("lists: [{name: a, action: redact, words: [alpha, beta]}]\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert watch.scanner("chat", "").lists[0][0].action is ContentAction.REDACT  # type: ignore[union-attr]
    path.write_text("lists: [{name: a, action: explode}]\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert watch.scanner("chat", "").lists[0][0].words == ["alpha", "beta"]  # type: ignore[union-attr]
    assert ContentWatch(None).scanner("chat", "") is None
