import json

import pytest

from llmesh.common import topics
from llmesh.common.events import InvalidEvent, Provenance, ReleaseEvent, ReleaseMode

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


def test_an_oversized_event_is_refused_before_it_is_parsed():
    payload = b'{"model": "chat", "version": 1, "artifact_uri": "/m", "label": "' + b"x" * 2_000_000 + b'"}'
    with pytest.raises(InvalidEvent, match=r"2000[0-9]+ bytes; at most 262144"):
        ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON)


def test_an_event_without_id_gets_the_same_id_from_the_same_bytes_at_the_same_place():
    payload = b'{"model": "chat", "version": 2, "artifact_uri": "/m", "mode": "rollback"}'
    first = ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON, place="llmesh.releases/0/7")
    again = ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON, place="llmesh.releases/0/7")
    elsewhere = ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON, place="llmesh.releases/0/9")
    assert first == again and first.event_id.startswith("derived-") and first.created_at == 0.0
    assert elsewhere.event_id != first.event_id
    proto = ReleaseEvent.model_validate_json(payload).to_proto()
    proto.event_id, proto.created_at = "", 0
    wire = proto.SerializeToString()
    assert (
        ReleaseEvent.parse(wire, topics.CONTENT_TYPE_PROTOBUF, place="p").event_id
        == ReleaseEvent.parse(wire, topics.CONTENT_TYPE_PROTOBUF, place="p").event_id
    )


def test_a_hand_written_event_is_signed_over_the_fields_it_carries():
    import hashlib
    import hmac
    import json

    fields = {"model": "chat", "version": 2, "artifact_uri": "/m", "mode": "swap"}
    for exclude in (
        {"event_id", "created_at", "signature", "provenance", "signer"},  # as the mesh signs an event without either
        {"event_id", "created_at", "signature", "signer"},  # "provenance": null, as a signer dumped every field before signers
        {"event_id", "created_at", "signature"},  # and every field of today's schema
    ):
        canonical = ReleaseEvent.model_validate(fields).model_dump(mode="json", exclude=exclude)
        signature = hmac.new(b"key", json.dumps(canonical, sort_keys=True).encode(), hashlib.sha256).hexdigest()
        event = ReleaseEvent.parse(json.dumps(fields | {"signature": signature}).encode(), topics.CONTENT_TYPE_JSON, place="p")
        event.check_signature(b"key")
    forged = ReleaseEvent.parse(json.dumps(fields | {"version": 3, "signature": signature}).encode(), "", place="p")
    with pytest.raises(InvalidEvent, match="bad signature"):
        forged.check_signature(b"key")


LINEAGE = Provenance(
    base_model="gpt2",
    base_model_digest=DIGEST,
    training_data_digest="b" * 64,
    training_code_commit="c" * 40,
    training_run_id="run-7",
    evaluation={"rouge_l": 0.42, "loss": 1.5},
    tags={"team": "search"},
)


def test_provenance_travels_in_both_wire_forms():
    event = ReleaseEvent(model="chat", version=3, artifact_uri="/m", provenance=LINEAGE)
    assert ReleaseEvent.from_proto(event.to_proto()) == event
    assert ReleaseEvent.parse(event.model_dump_json().encode(), topics.CONTENT_TYPE_JSON) == event
    assert not ReleaseEvent(model="chat", version=3, artifact_uri="/m").to_proto().HasField("provenance")


def test_the_signature_covers_the_provenance_and_events_without_one_sign_as_before():
    event = ReleaseEvent(model="chat", version=1, artifact_uri="/m", provenance=LINEAGE).signed(b"key")
    forged = event.model_copy(update={"provenance": LINEAGE.model_copy(update={"training_data_digest": "d" * 64})})
    with pytest.raises(InvalidEvent, match="bad signature"):
        forged.check_signature(b"key")
    plain = ReleaseEvent(model="chat", version=1, artifact_uri="/m")
    assert "provenance" not in json.loads(plain.canonical_bytes())  # signatures made before lineage existed still hold


@pytest.mark.parametrize(
    ("provenance", "reason"),
    [
        ({"evaluation": {"loss": "NaN"}}, "finite"),
        ({"tags": {f"t{i}": "x" for i in range(65)}}, "at most 64"),
        ({"tags": {"": "x"}}, "1-128 characters"),
        ({"tags": {"t": "x" * 1025}}, "at most 1024"),
        ({"training_run_id": "r" * 257}, "at most 256"),
        ({"builder": "me"}, "builder"),
    ],
)
def test_a_bad_provenance_is_refused_with_a_reason(provenance, reason):
    payload = json.dumps({"model": "chat", "version": 1, "artifact_uri": "/m", "provenance": provenance}).encode()
    with pytest.raises(InvalidEvent, match=reason):
        ReleaseEvent.parse(payload, topics.CONTENT_TYPE_JSON)


def test_a_demo_build_declares_its_lineage(tmp_path):
    from llmesh import client

    assert client.build_provenance(tmp_path) is None
    (tmp_path / client.BUILD_FILE).write_text(json.dumps({"final_loss": 5.1, "provenance": LINEAGE.model_dump()}))
    assert client.build_provenance(tmp_path) == LINEAGE
