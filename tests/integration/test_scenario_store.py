"""Scenario state in a real redis-server, as gateway replicas fold `llmesh.prompts` into it: replicas
applying the same log at once write each event once, a replay from offset 0 changes nothing, a
refused event is skipped for good, and what Redis holds is checked before it is trusted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmesh.common.events import InvalidEvent
from llmesh.common.prompts import PromptRelease, PromptTemplate, ScenarioMode, ScenarioState, ScenarioStore, scenario_key
from llmesh.common.registry import connect
from llmesh.common.validation import InvalidRequest

pytestmark = pytest.mark.slow


def _release(version: int, mode: ScenarioMode = ScenarioMode.RELEASE) -> PromptRelease:
    template = PromptTemplate(text=f"v{version}: {{{{ q }}}}", params={"q": {}})  # type: ignore[dict-item]
    return PromptRelease(scenario="s", version=version, mode=mode, template=template, model="chat", share_percent=50)


LOG = [
    _release(1),
    _release(2, ScenarioMode.CANARY),
    PromptRelease(scenario="s", mode=ScenarioMode.PROMOTE),
    _release(3),
    PromptRelease(scenario="s", mode=ScenarioMode.ROLLBACK),
]


@pytest.fixture
async def store(redis_port: int) -> AsyncIterator[ScenarioStore]:
    client = connect(f"redis://127.0.0.1:{redis_port}/0")
    await client.flushdb()
    yield ScenarioStore(client)
    await client.aclose()


async def _replica(store: ScenarioStore) -> int:
    applied = 0
    for offset, event in enumerate(LOG):
        applied += await store.apply(event, offset) is not None
    return applied


async def test_replicas_folding_the_same_log_at_once_apply_each_event_once(store: ScenarioStore):
    applied = await asyncio.gather(*(_replica(store) for _ in range(4)))
    assert sum(applied) == len(LOG)
    state = await store.get("s")
    assert state is not None and (state.primary, state.earlier, [h.version for h in state.history]) == (2, [1], [1, 2, 2, 3, 2])
    assert await _replica(store) == 0, "a replay from offset 0 changes nothing"
    assert await store.get("s") == state
    assert await store.names() == ["s"]


async def test_a_refused_event_is_skipped_and_later_ones_apply(store: ScenarioStore):
    await store.apply(_release(1), 0)
    with pytest.raises(InvalidEvent):
        await store.apply(PromptRelease(scenario="s", mode=ScenarioMode.PROMOTE), 1)
    await store.skip("s", 1)
    assert await store.mark_refused(1) and not await store.mark_refused(1), "one replica dead-letters it"
    assert await store.apply(PromptRelease(scenario="s", mode=ScenarioMode.PROMOTE), 1) is None, "a replay skips it"
    state = await store.apply(_release(2), 2)
    assert state is not None and state.primary == 2


async def test_what_redis_holds_is_checked_before_it_is_trusted(store: ScenarioStore):
    state = await store.apply(_release(1), 0)
    assert state is not None
    await store.redis.hset(scenario_key("other"), "state", state.model_dump_json())
    assert await store.get("other") is None, "a state filed under another scenario's name is not used"
    await store.redis.hset(scenario_key("s"), "state", '{"name": "s", "primary": 1, "versions": {"1": {"template": "x"}}}')
    with pytest.raises(InvalidRequest, match="stored corrupt"):
        await store.get("s")


async def test_a_state_is_validated_once_per_offset(store: ScenarioStore, monkeypatch: pytest.MonkeyPatch):
    await store.apply(_release(1), 0)
    parsed = []
    real = ScenarioState.model_validate_json
    monkeypatch.setattr(ScenarioState, "model_validate_json", lambda raw: parsed.append(raw) or real(raw))
    for _ in range(5):
        assert (await store.get("s")).primary == 1  # type: ignore[union-attr]
    assert len(parsed) == 1, "requests read the offset, not the state, while it stands"
    other = ScenarioStore(store.redis)  # another gateway replica applies the next event
    await other.apply(_release(2), 1)
    assert (await store.get("s")).primary == 2  # type: ignore[union-attr]
    assert len(parsed) == 3, "a new offset: read and validated again"
