import json

import pytest

from llmesh.common import topics
from llmesh.common.events import InvalidEvent, ReleaseEvent, ReleaseMode

DIGEST = "a" * 64


def test_proto_round_trip_keeps_every_field():
    event = ReleaseEvent(
        model="chat", version=3, artifact_uri="file:///m", sha256={"w": DIGEST}, mode=ReleaseMode.CANARY, share_percent=10
    )
    assert ReleaseEvent.from_proto(event.to_proto()) == event


def test_json_from_any_kafka_client_is_accepted():
    payload = json.dumps({"model": "chat", "version": 2, "artifact_uri": "/models/chat-v2", "sha256": {"w": DIGEST}}).encode()
    event = ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON)
    assert (event.model, event.version, event.mode) == ("chat", 2, ReleaseMode.SWAP)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid release event"),
        (b'{"model": "chat", "version": 0, "artifact_uri": "/m"}', "version"),
        (b'{"model": "Chat!", "version": 1, "artifact_uri": "/m"}', "model"),
        (b'{"model": "chat", "version": 1, "artifact_uri": "/m", "surprise": 1}', "surprise"),
        (b'{"model": "chat", "version": 1, "artifact_uri": "/m", "sha256": {"w": "xyz"}}', "64 lowercase hex"),
    ],
)
def test_bad_json_is_refused_with_a_reason(payload, reason):
    with pytest.raises(InvalidEvent, match=reason):
        ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON)


def test_undecodable_protobuf_is_refused():
    with pytest.raises(InvalidEvent, match="undecodable"):
        ReleaseEvent.parse(b"\xff\xff\xff", topics.CONTENT_TYPE_PROTOBUF)


def test_signature_covers_the_fields():
    event = ReleaseEvent(model="chat", version=1, artifact_uri="/m").signed(b"key")
    tampered = event.model_copy(update={"version": 2})
    assert event.signed(b"key").signature == event.signature
    assert tampered.signed(b"key").signature != event.signature


def test_traceparent_is_kept_when_valid_and_made_when_not():
    from llmesh.common.status import traceparent

    valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert traceparent(valid) == valid
    made = traceparent("garbage")
    assert made != "garbage" and traceparent(made) == made


def test_signature_check_refuses_missing_and_wrong_signatures():
    event = ReleaseEvent(model="chat", version=1, artifact_uri="/m")
    event.check_signature(None)  # no key configured: anything goes
    event.signed(b"key").check_signature(b"key")
    with pytest.raises(InvalidEvent, match="unsigned event"):
        event.check_signature(b"key")
    with pytest.raises(InvalidEvent, match="bad signature"):
        event.signed(b"other").check_signature(b"key")
