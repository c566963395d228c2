"""Sensitive content on production traffic: word lists and patterns, per model or scenario, checked on
every prompt and answer, each list with its action (count, redact, refuse).

The rules are a YAML file (`LLMESH_CONTENT_RULES_FILE`) that is read again when it changes, without
a restart; a file that does not validate keeps the rules in force (and is logged). Answers are checked
as they stream: `AnswerFilter` holds back the last `holdback_chars` characters of what it has seen, so
a word split across two chunks is still found (a pattern longer than the hold-back may be missed).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("llmesh.content")
MASK = "[redacted]"
RELOAD_CHECK_S = 1.0  # how often the file's modification time is looked at


class ContentAction(StrEnum):
    COUNT = "count"  # counted in the metrics, passed through
    REDACT = "redact"  # masked in prompts (before the model sees them) and answers
    REFUSE = "refuse"  # the request is refused (a prompt) or stopped (an answer) with a clear status


class ContentList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    action: ContentAction = ContentAction.COUNT
    words: list[str] = Field(default_factory=list, max_length=10_000)  # whole words, any case
    patterns: list[str] = Field(default_factory=list, max_length=1_000)  # regular expressions
    models: list[str] = Field(default_factory=list)  # where it applies (empty: every model) ...
    scenarios: list[str] = Field(default_factory=list)  # ... and every scenario

    @model_validator(mode="after")
    def _compiles(self) -> ContentList:
        if not self.words and not self.patterns:
            raise ValueError(f"list {self.name!r} has neither words nor patterns")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"list {self.name!r}: pattern {pattern!r}: {err}") from None
        return self

    def regex(self) -> re.Pattern[str]:
        words = [rf"\b{re.escape(w)}\b" for w in sorted(self.words, key=len, reverse=True) if w.strip()]
        return re.compile("|".join([*words, *(f"(?:{p})" for p in self.patterns)]), re.IGNORECASE)

    def applies(self, model: str, scenario: str) -> bool:
        return (not self.models or model in self.models) and (not self.scenarios or scenario in self.scenarios)


class ContentRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lists: list[ContentList] = Field(default_factory=list)
    holdback_chars: int = Field(default=64, ge=1, le=4096, description="of a streamed answer, held until more text comes")

    @model_validator(mode="after")
    def _distinct(self) -> ContentRules:
        names = [c.name for c in self.lists]
        if len(names) != len(set(names)):
            raise ValueError("list names must be distinct")
        return self


@dataclass(frozen=True)
class Hit:
    list: str
    action: ContentAction


@dataclass(frozen=True)
class Scanner:
    """The lists that apply to one request, compiled."""

    lists: tuple[tuple[ContentList, re.Pattern[str]], ...]
    holdback: int

    def scenario_label(self, scenario: str) -> str:
        """The scenario as a metric label: only scenarios the rules name (a client cannot mint series)."""
        return scenario if any(scenario in c.scenarios for c, _ in self.lists) else ""

    def scan(self, text: str, start: int = 0, end: int | None = None) -> tuple[str, list[Hit]]:
        """`text[start:end]` with what redact lists found masked, and every hit in it. The text around
        is context only (a word is whole only if the characters on both sides are not letters)."""
        end = len(text) if end is None else end
        hits: list[Hit] = []
        spans: list[tuple[int, int]] = []
        for content, pattern in self.lists:
            for match in pattern.finditer(text, start):
                if match.start() >= end:
                    break
                if start <= match.start() < match.end() <= end:
                    hits.append(Hit(content.name, content.action))
                    if content.action is ContentAction.REDACT:
                        spans.append(match.span())
        return _masked(text, start, end, spans), hits

    def refusal(self, hits: list[Hit]) -> str:
        refused = sorted({h.list for h in hits if h.action is ContentAction.REFUSE})
        return (
            f"the {', '.join(refused)} content list{'s' if len(refused) > 1 else ''} refuse{'' if len(refused) > 1 else 's'}"
            if refused
            else ""
        )


def _masked(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> str:
    out, at = [], start
    for s, e in sorted(spans):
        if s < at:  # overlaps the one before
            continue
        out += [text[at:s], MASK]
        at = e
    out.append(text[at:end])
    return "".join(out)


class AnswerFilter:
    """Checks an answer as it streams: `feed` returns what may leave now, `finish` the rest."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner
        self._pending = ""
        self._context = ""  # the last character that left: whole-word boundaries hold across chunks
        self.hits: list[Hit] = []

    def feed(self, text: str) -> str:
        self._pending += text
        cut = len(self._pending) - self.scanner.holdback
        if cut <= 0:
            return ""
        full = self._context + self._pending
        offset = len(self._context)
        spans = [(m.start() - offset, m.end() - offset) for _, p in self.scanner.lists for m in p.finditer(full, offset)]
        moved = True
        while moved:  # never cut through a match: it leaves whole, and is counted once
            moved = False
            for s, e in spans:
                if s < cut < e:
                    cut, moved = s, True
        return self._emit(cut)

    def finish(self) -> str:
        return self._emit(len(self._pending))

    def _emit(self, cut: int) -> str:
        if cut <= 0:
            return ""
        full = self._context + self._pending
        offset = len(self._context)
        out, hits = self.scanner.scan(full, offset, offset + cut)
        self.hits += hits
        self._context, self._pending = self._pending[cut - 1], self._pending[cut:]
        return out


class ContentWatch:
    """The rules of a file, read again when it changes (checked at most every RELOAD_CHECK_S)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rules = ContentRules()
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._scanners: dict[tuple[str, str], Scanner | None] = {}
        if path is not None:
            self.rules = ContentRules.model_validate(yaml.safe_load(path.read_text()) or {})  # a bad file fails start-up
            self._stamp = _stamp(path)

    def scanner(self, model: str, scenario: str) -> Scanner | None:
        """The compiled lists for a request to `model` in `scenario`; None when none apply."""
        self._reload()
        key = (model, scenario)
        if key not in self._scanners:
            if len(self._scanners) > 10_000:
                self._scanners.clear()
            lists = tuple((c, c.regex()) for c in self.rules.lists if c.applies(model, scenario))
            self._scanners[key] = Scanner(lists, self._holdback(lists)) if lists else None
        return self._scanners[key]

    def _holdback(self, lists: tuple[tuple[ContentList, re.Pattern[str]], ...]) -> int:
        longest = max((len(w) for c, _ in lists for w in c.words), default=0)
        return max(self.rules.holdback_chars, longest + 1)

    def _reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            rules = ContentRules.model_validate(yaml.safe_load(self.path.read_text()) or {})
        except (OSError, ValueError, yaml.YAMLError) as err:
            log.error("content rules not reloaded: the rules in force stay", extra={"path": str(self.path), "error": str(err)})
            return
        self.rules, self._stamp, self._scanners = rules, stamp, {}
        log.info("content rules reloaded", extra={"path": str(self.path), "lists": len(rules.lists)})


def _stamp(path: Path) -> tuple[float, int]:
    st = os.stat(path)
    return st.st_mtime, st.st_size
