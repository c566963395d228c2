"""Prompt templates, versioned per scenario and released on their own topic (`llmesh.prompts`).

A scenario ("support-summary") binds a name to a template version, the model that answers it (an
alias, or a pinned version) and its sampling defaults. Operators publish signed `PromptRelease`
events: `release` (the new primary), `canary` (a candidate answering a share of clients), `shadow` (a
candidate whose answers, to a share of requests, only eval sees), `promote`, `rollback`. Every gateway replica folds the log into one `ScenarioState` per scenario, stored in Redis
with the offset it reflects, so that a replica that applies an event twice, or a replay from offset
0, changes nothing (`apply` is pure; the store writes only a state newer than its own).

Templates render in Jinja2's SandboxedEnvironment with strict undefined variables; their parameters
are typed and checked before rendering, so a client's variables cannot reach anything but the text.

Keys:
  llmesh:scenarios                  set of scenario names released
  llmesh:scenario:{name}            hash: state (JSON ScenarioState), offset (of the last event applied)
  llmesh:scenario:refused           set of "{offset}": events dead-lettered already (one replica does it)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum

import jinja2
import jinja2.meta
import redis.asyncio as redis
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmesh.common.events import InvalidEvent
from llmesh.common.validation import MODEL_NAME_PATTERN, InvalidRequest, parse_model_ref, shown, summarize

SCENARIOS = "llmesh:scenarios"
REFUSED = "llmesh:scenario:refused"
MAX_TEMPLATE_CHARS = 32 * 1024
MAX_PARAMS = 64
MAX_EVENT_BYTES = 128 * 1024
MAX_HISTORY = 200  # entries kept per scenario (the topic keeps every event)
PARAM_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


def scenario_key(name: str) -> str:
    return f"llmesh:scenario:{name}"


class ParamType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"


_SAMPLE: dict[ParamType, object] = {ParamType.STRING: "x", ParamType.INTEGER: 0, ParamType.NUMBER: 0.5, ParamType.BOOLEAN: False}
_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=256)
def _compiled(text: str) -> jinja2.Template:
    return _ENV.from_string(text)


class TemplateParam(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType = ParamType.STRING
    required: bool = True
    default: str | int | float | bool | None = None
    max_length: int = Field(default=4096, ge=1, le=MAX_TEMPLATE_CHARS)  # of a string value
    description: str = Field(default="", max_length=512)

    def value(self, name: str, given: object) -> object:
        """`given` checked against the type (None: the default, or refused when required)."""
        if given is None:
            if self.required and self.default is None:
                raise InvalidRequest(f"variable {name!r} is required ({self.type.value})")
            return self.default
        if self.type is ParamType.STRING and isinstance(given, str):
            if len(given) > self.max_length:
                raise InvalidRequest(f"variable {name!r} has {len(given)} characters; the limit is {self.max_length}")
            return given
        if self.type is ParamType.BOOLEAN and isinstance(given, bool):
            return given
        if isinstance(given, (int, float)) and not isinstance(given, bool) and math.isfinite(given):
            if self.type is ParamType.NUMBER:
                return given
            if self.type is ParamType.INTEGER and float(given).is_integer():
                return int(given)  # protobuf Struct carries every number as a double
        raise InvalidRequest(f"variable {name!r} must be {self.type.value}, got {type(given).__name__}")


class PromptTemplate(BaseModel):
    """A template's text and typed parameters; checked to compile and to render at release."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=MAX_TEMPLATE_CHARS)
    params: dict[str, TemplateParam] = Field(default_factory=dict, max_length=MAX_PARAMS)
    tuned_for: str = Field(default="", max_length=200)  # the model version it was tuned for ("chat@2"), if any

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, TemplateParam]) -> dict[str, TemplateParam]:
        for name, param in value.items():
            if re.fullmatch(PARAM_NAME_PATTERN, name) is None:
                raise ValueError(f"parameter name {name[:80]!r} is not an identifier")
            if param.default is not None:
                param.value(name, param.default)
        return value

    @model_validator(mode="after")
    def _renders(self) -> PromptTemplate:
        try:
            used = jinja2.meta.find_undeclared_variables(_ENV.parse(self.text))
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"template syntax error on line {err.lineno}: {err.message}") from None
        if undeclared := sorted(used - set(self.params)):
            raise ValueError(f"the template uses undeclared parameters: {', '.join(undeclared)}")
        self.render({name: _SAMPLE[p.type] for name, p in self.params.items()})  # sandbox violations show now
        return self

    def render(self, variables: Mapping[str, object]) -> str:
        if unknown := sorted(set(variables) - set(self.params)):
            raise InvalidRequest(f"unknown variables: {', '.join(shown(n) for n in unknown[:5])}")
        values = {name: param.value(name, variables.get(name)) for name, param in self.params.items()}
        try:
            return _compiled(self.text).render(values)
        except jinja2.TemplateError as err:  # SecurityError included
            raise InvalidRequest(f"the template could not render: {str(err)[:200]}") from None


class ScenarioSampling(BaseModel):
    """Defaults for what the client leaves unset (the gateway's limits still apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)


class ScenarioMode(StrEnum):
    RELEASE = "release"  # the version becomes the primary
    CANARY = "canary"  # the version answers share_percent of clients (by API key)
    SHADOW = "shadow"  # share_percent of requests are also rendered with it and mirrored; eval scores the pairs
    PROMOTE = "promote"  # the canary becomes the primary
    ROLLBACK = "rollback"  # drop the canary, else go back to the previous primary


class PromptRelease(BaseModel):
    """A release event on `llmesh.prompts` (JSON), signed like model releases (HMAC-SHA256)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    scenario: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(default=0, ge=0, le=2**31 - 1)  # 0: promote or roll back whatever is there
    mode: ScenarioMode = ScenarioMode.RELEASE
    template: PromptTemplate | None = None
    model: str = Field(default="", max_length=200)  # "chat" (its routing: primary, canary) or "chat@2"
    sampling: ScenarioSampling = Field(default_factory=ScenarioSampling)
    share_percent: int = Field(default=100, ge=0, le=100)
    token_budget_per_hour: int = Field(default=0, ge=0)  # 0: none; exported for the spend alert
    author: str = Field(default="", max_length=256)
    reason: str = Field(default="", max_length=2048)
    signature: str = ""
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _complete(self) -> PromptRelease:
        if self.mode in (ScenarioMode.RELEASE, ScenarioMode.CANARY, ScenarioMode.SHADOW):
            if self.version < 1 or self.template is None or not self.model:
                raise ValueError(f"a {self.mode.value} names its version (>= 1), template and model")
            try:
                parse_model_ref(self.model)
            except InvalidRequest as err:
                raise ValueError(str(err)) from None
        return self

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude={"signature"}), sort_keys=True).encode()

    def signed(self, key: bytes | None) -> PromptRelease:
        return self.model_copy(update={"signature": _mac(key, self.canonical_bytes())}) if key else self

    def check_signature(self, key: bytes | None) -> None:
        if key and not hmac.compare_digest(self.signature, _mac(key, self.canonical_bytes())):
            raise InvalidEvent("bad signature: the event is not signed with the configured release key")

    @classmethod
    def parse(cls, payload: bytes) -> PromptRelease:
        if len(payload) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"prompt release is {len(payload)} bytes; at most {MAX_EVENT_BYTES} are read")
        try:
            return cls.model_validate_json(payload)
        except ValidationError as err:
            raise InvalidEvent(f"invalid prompt release: {summarize(err)}") from None


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


class TemplateVersion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    template: PromptTemplate
    model: str
    sampling: ScenarioSampling
    token_budget_per_hour: int = 0
    author: str = ""
    reason: str = ""
    released_at: float = 0.0

    def same_release(self, event: PromptRelease) -> bool:
        return (self.template, self.model, self.sampling) == (event.template, event.model, event.sampling)


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float
    mode: ScenarioMode
    version: int
    author: str = ""
    reason: str = ""
    event_id: str = ""


class ScenarioState(BaseModel):
    """What a scenario serves: the primary template version, maybe a canary, the versions released."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    primary: int = 0
    earlier: list[int] = Field(default_factory=list)  # the primaries before, newest last (for rollback)
    candidate: int = 0
    candidate_mode: ScenarioMode = ScenarioMode.CANARY  # or SHADOW
    share_percent: int = 0
    versions: dict[int, TemplateVersion] = Field(default_factory=dict)
    history: list[HistoryEntry] = Field(default_factory=list)
    event_ids: list[str] = Field(default_factory=list)  # the latest applied (bounded): a re-sent event is not applied twice

    def serving(self) -> TemplateVersion:
        return self.versions[self.primary]

    def budget(self) -> int:
        return self.serving().token_budget_per_hour if self.primary else 0


def apply(state: ScenarioState | None, event: PromptRelease) -> ScenarioState:
    """The scenario after `event`; InvalidEvent (the reason) when it cannot apply. Pure."""
    state = state or ScenarioState(name=event.scenario)
    if event.event_id in state.event_ids:
        return state
    update: dict[str, object]
    if event.mode in (ScenarioMode.RELEASE, ScenarioMode.CANARY, ScenarioMode.SHADOW):
        update = _released(state, event)
    elif event.mode is ScenarioMode.PROMOTE:
        if not state.candidate or event.version not in (0, state.candidate):
            raise InvalidEvent(f"scenario {event.scenario} has no candidate {event.version or ''} to promote")
        update = {"primary": state.candidate, "earlier": [*state.earlier, state.primary], "candidate": 0, "share_percent": 0}
    elif event.version and event.version not in (state.candidate, state.primary):
        raise InvalidEvent(f"scenario {event.scenario} v{event.version} is neither its candidate nor its primary")
    elif state.candidate:  # rollback: the candidate goes first
        if event.version == state.primary:
            raise InvalidEvent(f"scenario {event.scenario} has a candidate: roll it back first (v{state.candidate})")
        update = {"candidate": 0, "share_percent": 0}
    elif state.earlier:
        update = {"primary": state.earlier[-1], "earlier": state.earlier[:-1]}
    else:
        raise InvalidEvent(f"scenario {event.scenario} has no earlier version to roll back to")
    after = state.model_copy(update=update)
    entry = HistoryEntry(
        at=event.created_at,
        mode=event.mode,
        version=after.candidate or after.primary,
        author=event.author,
        reason=event.reason,
        event_id=event.event_id,
    )
    return after.model_copy(
        update={"history": [*state.history, entry][-MAX_HISTORY:], "event_ids": [*state.event_ids, event.event_id][-MAX_HISTORY:]}
    )


def _released(state: ScenarioState, event: PromptRelease) -> dict[str, object]:
    assert event.template is not None
    known = state.versions.get(event.version)
    if known is not None and not known.same_release(event):
        raise InvalidEvent(
            f"scenario {event.scenario} v{event.version} was released with another template: versions are immutable"
        )
    released = known or TemplateVersion(
        version=event.version,
        template=event.template,
        model=event.model,
        sampling=event.sampling,
        token_budget_per_hour=event.token_budget_per_hour,
        author=event.author,
        reason=event.reason,
        released_at=event.created_at,
    )
    versions = {**state.versions, event.version: released}
    if event.mode is not ScenarioMode.RELEASE:
        if not state.primary or event.version == state.primary:
            raise InvalidEvent(f"a {event.mode.value} of scenario {event.scenario} needs a primary other than v{event.version}")
        return {
            "versions": versions,
            "candidate": event.version,
            "candidate_mode": event.mode,
            "share_percent": event.share_percent,
        }
    earlier = [*state.earlier, state.primary] if state.primary and state.primary != event.version else state.earlier
    return {"versions": versions, "primary": event.version, "earlier": earlier, "candidate": 0, "share_percent": 0}


def _checked(name: str, raw: str) -> ScenarioState | None:
    try:
        state = ScenarioState.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidRequest(f"scenario {shown(name)} is stored corrupt: {summarize(err)}") from None
    return state if state.name == name and (not state.primary or state.primary in state.versions) else None


# Write the state only over the one it was computed from (the offset read): two replicas applying the
# same event compute the same state, and the second write is refused.
_WRITE = """
local current = redis.call('HGET', KEYS[1], 'offset')
if (current or '-1') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'offset', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""


class ScenarioStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._write = client.register_script(_WRITE)
        # the states read, by name, with the offset they reflect: a request reads the offset only
        # (validating a state compiles its templates: about 1 ms, 10 ms with a long history)
        self._read: dict[str, tuple[str, ScenarioState | None]] = {}

    async def names(self) -> list[str]:
        return sorted(str(n) for n in await self.redis.smembers(SCENARIOS))

    async def get(self, name: str) -> ScenarioState | None:
        """The scenario's state, validated (what Redis holds is checked before it is trusted)."""
        key = scenario_key(name)
        offset = await self.redis.hget(key, "offset")
        if offset is None:
            return None
        if (read := self._read.get(name)) is not None and read[0] == offset:
            return read[1]
        raw, offset = await self.redis.hmget(key, ["state", "offset"])  # one write sets both: a consistent pair
        state = None if raw is None else _checked(name, str(raw))
        self._read[name] = (str(offset), state)
        return state

    async def apply(self, event: PromptRelease, offset: int) -> ScenarioState | None:
        """Apply the event read at `offset`; None if the stored state is at or past it (a replay)."""
        key = scenario_key(event.scenario)
        while True:
            raw_offset = await self.redis.hget(key, "offset")
            if raw_offset is not None and int(raw_offset) >= offset:
                return None
            state = apply(await self.get(event.scenario), event)
            expected = "-1" if raw_offset is None else str(int(raw_offset))
            args = [expected, state.model_dump_json(), str(offset), event.scenario]
            if await self._write(keys=[key, SCENARIOS], args=args):
                return state

    async def skip(self, scenario: str, offset: int) -> None:
        """A refused event still moves the scenario's offset, so that a replay does not refuse it again."""
        key = scenario_key(scenario)
        raw_offset = await self.redis.hget(key, "offset")
        if raw_offset is None or int(raw_offset) < offset:
            await self.redis.hset(key, "offset", str(offset))

    async def mark_refused(self, offset: int) -> bool:
        """True for the first replica to refuse the event at `offset` (it dead-letters it)."""
        return bool(await self.redis.sadd(REFUSED, str(offset)))
