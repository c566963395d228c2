"""The mesh's seal: what a Kafka client without the mesh key cannot forge, move or redirect."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmesh.common.seal import REFUSED, BrokenSeal, MeshSeal
from llmesh.common.topics import Header

KEY = b"mesh-key"
TOPIC = "llmesh.replies.g1"
BODY = b"\x0a\x02r1\x20\x01"
HEADERS = {Header.REPLY_TO: "llmesh.replies.g1", Header.DEADLINE: "1700000000000", Header.TRACEPARENT: "00-x"}


def sealed(seal: MeshSeal = MeshSeal(KEY)) -> dict[str, str]:
    return seal.headers(TOPIC, b"r1", BODY, dict(HEADERS))


def refused(topic: str, reason: str) -> float:
    return REFUSED.labels(topic, reason)._value.get()


def test_a_sealed_message_passes():
    MeshSeal(KEY).check(TOPIC, b"r1", BODY, sealed())


@pytest.mark.parametrize(
    ("topic", "key", "body", "change"),
    [
        ("llmesh.shadow.results", b"r1", BODY, {}),  # moved to another topic
        (TOPIC, b"r2", BODY, {}),  # another request's key
        (TOPIC, b"r1", BODY + b"\x28\x01", {}),  # the body changed
        (TOPIC, b"r1", BODY, {Header.REPLY_TO: "attacker.replies"}),  # the answer redirected
        (TOPIC, b"r1", BODY, {Header.DEADLINE: "9999999999999"}),  # the deadline moved
    ],
)
def test_any_change_to_what_is_sealed_breaks_the_seal(topic, key, body, change):
    with pytest.raises(BrokenSeal, match="bad seal"):
        MeshSeal(KEY).check(topic, key, body, sealed() | change)


def test_a_traceparent_is_not_sealed():
    MeshSeal(KEY).check(TOPIC, b"r1", BODY, sealed() | {Header.TRACEPARENT: "00-other"})


def test_unsealed_and_foreign_seals_are_refused_and_counted():
    label = "llmesh.replies.*"  # every gateway's reply topic counts as one
    before = refused(label, "unsealed"), refused(label, "bad seal")
    with pytest.raises(BrokenSeal, match="unsealed"):
        MeshSeal(KEY).check(TOPIC, b"r1", BODY, dict(HEADERS))
    with pytest.raises(BrokenSeal, match="bad seal"):
        MeshSeal(KEY).check(TOPIC, b"r1", BODY, sealed(MeshSeal(b"another key")))
    assert (refused(label, "unsealed"), refused(label, "bad seal")) == (before[0] + 1, before[1] + 1)


def test_without_a_key_nothing_is_sealed_or_checked():
    assert MeshSeal(None).headers(TOPIC, b"r1", BODY, dict(HEADERS)) == HEADERS
    MeshSeal(None).check(TOPIC, b"r1", BODY, dict(HEADERS))


def test_header_values_arrive_as_bytes_from_kafka():
    arrived = {k: v.encode() for k, v in sealed().items()}
    MeshSeal(KEY).check(TOPIC, b"r1", BODY, arrived)


@given(st.binary(max_size=64), st.binary(max_size=64), st.text(max_size=16), st.text(max_size=16))
def test_fields_cannot_be_shifted_between_parts(body_a, body_b, reply_a, reply_b):
    """Length-prefixed parts: moving bytes from one part to the next changes the seal."""
    seal = MeshSeal(KEY)
    one = seal.headers(TOPIC, body_a, body_b, {Header.REPLY_TO: reply_a})
    other = seal.headers(TOPIC, body_a + body_b[:1], body_b[1:], {Header.REPLY_TO: reply_b})
    if body_b and (body_a, body_b) != (body_a + body_b[:1], body_b[1:]):
        assert one[Header.SEAL] != other[Header.SEAL]
