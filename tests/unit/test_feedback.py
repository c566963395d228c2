"""Feedback: what a client may send, and how eval counts it (a request's latest rating, once)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmesh.common.feedback import FeedbackInput
from llmesh.v1 import events_pb2
from services.eval.stats import GenerationStats


def _rating(request_id: str, rating: int, version: int = 1, label: str = "", scenario: str = "") -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(
        request_id=request_id, model="chat", version=version, rating=rating, label=label, scenario=scenario
    )


def test_a_requests_latest_rating_counts_once_per_version_and_scenario():
    stats = GenerationStats()
    for event in (
        _rating("a", 1, label="wrong"),
        _rating("a", 4, label="good"),  # changed their mind: replaces the first
        _rating("a", 4, label="good"),  # a replay: changes nothing
        _rating("b", 5, label="good"),
        _rating("c", 2, version=2, scenario="support"),
    ):
        stats.add_feedback(event)
    rows = {(r.model, r.version, r.scenario): r for r in stats.report().feedback}
    v1 = rows[("chat", 1, "")]
    assert (v1.ratings, v1.rating_mean, dict(v1.labels)) == (2, 4.5, {"good": 2})
    assert rows[("chat", 2, "support")].rating_mean == 2
    assert [r.version for r in stats.report(model="other").feedback] == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"rating": 0}, "rating"),
        ({"rating": 6}, "rating"),
        ({"label": "not a label!"}, "label"),
        ({"comment": "x" * 2001}, "comment"),
        ({"request_id": "../../etc"}, "request_id"),
        ({"request_id": ""}, "request_id"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as err:
        FeedbackInput.model_validate({"request_id": "abc123", "rating": 4} | fields)
    assert err.value.errors()[0]["loc"] == (field,)
