"""The audit trail's chain (llmesh/common/audit.py, verify): pure, no Redis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmesh.common.audit import GENESIS, AuditAction, AuditEntry, AuditSource, Head, verify


def _trail(n: int) -> tuple[list[AuditEntry], Head]:
    entries, previous = [], GENESIS
    for i in range(n):
        entry = AuditEntry(action=AuditAction.RELEASE_APPLIED, source=AuditSource.KAFKA, model="chat", version=i + 1)
        entries.append(entry.chained(previous))
        previous = entries[-1].digest
    return entries, Head(count=n, digest=previous)


def test_an_intact_trail_verifies():
    assert verify(*_trail(5)) == []
    assert verify(*_trail(0)) == []


def test_an_edited_entry_is_found():
    entries, head = _trail(4)
    entries[1] = entries[1].model_copy(update={"actor": "someone else"})
    assert verify(entries, head) == [f"entry 1 ({entries[1].id}) was changed after it was written"]


def test_an_edit_that_recomputes_the_digest_breaks_the_next_link():
    entries, head = _trail(4)
    entries[1] = entries[1].model_copy(update={"reason": "rewritten"}).chained(entries[1].previous)
    (problem,) = verify(entries, head)
    assert problem.startswith("entry 2") and "removed, inserted or moved" in problem


@given(st.integers(min_value=1, max_value=8), st.data())
def test_removing_any_entry_is_found(n, data):
    entries, head = _trail(n)
    removed = data.draw(st.integers(min_value=0, max_value=n - 1))
    assert verify(entries[:removed] + entries[removed + 1 :], head) != []


def test_removing_the_last_entry_is_found_by_the_head():
    entries, head = _trail(3)
    assert verify(entries[:-1], head) == ["the trail holds 2 entries; its head says 3: entries were removed or added"]


def test_swapping_two_entries_is_found():
    entries, head = _trail(3)
    entries[0], entries[1] = entries[1], entries[0]
    assert len(verify(entries, head)) >= 2


def test_since_takes_a_duration_back_or_an_iso_time():
    import pytest
    import typer

    from llmesh.cli.audit import since_time

    assert since_time("90s", 1000.0) == 910.0
    assert since_time("2h", 10_000.0) == 10_000.0 - 7200
    assert since_time("2026-12-01T00:00:00+00:00", 0.0) == 1796083200.0
    with pytest.raises(typer.BadParameter, match="neither a duration"):
        since_time("yesterday", 0.0)
