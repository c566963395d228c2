"""Release events as pydantic models: validated at the edge whether they arrive as protobuf or JSON."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from llmesh.common import topics
from llmesh.common.validation import MODEL_NAME_PATTERN, summarize
from llmesh.v1 import events_pb2


class ReleaseMode(StrEnum):
    SWAP = "swap"
    SHADOW = "shadow"
    CANARY = "canary"
    ROLLBACK = "rollback"
    RETIRE = "retire"
    APPROVE = "approve"  # the author approves the release of `version` that waits for approval
    REJECT = "reject"  # ... or rejects it: never routed, unloaded


DECISIONS = (ReleaseMode.APPROVE, ReleaseMode.REJECT)  # modes that decide on a pending release: no artifacts


class InvalidEvent(ValueError):
    """An event that cannot be applied; the message says why."""


MAX_ARTIFACT_FILES = 256
MAX_PROVENANCE_ENTRIES = 64  # evaluation results, and tags
MAX_EVENT_BYTES = 256 * 1024
OPTIONAL_FIELDS = ("provenance", "signer")  # added after events were first signed: signed only when set
# The empty optional fields a signer may have written: none (as the mesh signs), every field of the
# schema before signers (`"provenance": null`), every field of today's.
SIGNED_FORMS: tuple[frozenset[str], ...] = (
    frozenset(),
    frozenset({"provenance"}),
    frozenset(OPTIONAL_FIELDS),
)  # 256 files with their digests and every text field at its limit fit in far less


class Provenance(BaseModel):
    """The lineage of a version, as its release event declares it (proto: llmesh.v1.Provenance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(default="", max_length=512)
    base_model_digest: str = Field(default="", max_length=128)
    training_data_digest: str = Field(default="", max_length=128)
    training_code_commit: str = Field(default="", max_length=128)
    training_run_id: str = Field(default="", max_length=256)
    evaluation: dict[str, FiniteFloat] = Field(default_factory=dict, max_length=MAX_PROVENANCE_ENTRIES)
    tags: dict[str, str] = Field(default_factory=dict, max_length=MAX_PROVENANCE_ENTRIES)

    @field_validator("evaluation", "tags")
    @classmethod
    def _bounded_entries(cls, value: dict[str, object]) -> dict[str, object]:
        for name, entry in value.items():
            if not name or len(name) > 128 or (isinstance(entry, str) and len(entry) > 1024):
                raise ValueError(f"{name[:80]!r}: names are 1-128 characters, values at most 1024")
        return value

    def to_proto(self) -> events_pb2.Provenance:
        return events_pb2.Provenance(**self.model_dump())

    @classmethod
    def from_proto(cls, msg: events_pb2.Provenance) -> Provenance:
        return cls(
            base_model=msg.base_model,
            base_model_digest=msg.base_model_digest,
            training_data_digest=msg.training_data_digest,
            training_code_commit=msg.training_code_commit,
            training_run_id=msg.training_run_id,
            evaluation=dict(msg.evaluation),
            tags=dict(msg.tags),
        )


class ReleaseEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1, le=2**31 - 1)
    label: str = Field(default="", max_length=128)
    artifact_uri: str = Field(default="", max_length=4096)  # every mode but approve and reject names one
    sha256: dict[str, str] = Field(default_factory=dict)
    mode: ReleaseMode = ReleaseMode.SWAP
    share_percent: int = Field(default=100, ge=0, le=100)
    author: str = Field(default="", max_length=256)
    reason: str = Field(default="", max_length=2048)
    signer: str = Field(default="", max_length=128, pattern=r"^[A-Za-z0-9._@-]*$")  # a named signer's id, or the shared key
    signature: str = ""
    created_at: float = Field(default_factory=time.time)
    provenance: Provenance | None = None
    _derived: frozenset[str] = PrivateAttr(default=frozenset())  # fields parse filled in: not signed

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ARTIFACT_FILES:
            raise ValueError(f"at most {MAX_ARTIFACT_FILES} artifact files, got {len(value)}")
        for name, digest in value.items():
            if not name or len(name) > 255 or "/" in name or "\\" in name or name in (".", ".."):
                raise ValueError(f"{name[:80]!r} is not a plain file name")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 of {name!r} is not 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _names_artifacts(self) -> ReleaseEvent:
        if not self.artifact_uri and self.mode not in DECISIONS:
            raise ValueError(f"a {self.mode.value} release names its artifacts (artifact_uri)")
        return self

    def artifact_dir(self) -> Path:
        """The artifact directory: absolute, no `..` (where it may lie is infer's `artifact_roots`)."""
        parsed = urlparse(self.artifact_uri)
        if parsed.scheme not in ("", "file"):
            raise InvalidEvent(f"artifact_uri scheme {parsed.scheme!r} is not supported (use a directory or file://)")
        path = Path(parsed.path if parsed.scheme else self.artifact_uri)
        if not path.is_absolute() or ".." in path.parts:
            raise InvalidEvent(f"artifact_uri {self.artifact_uri[:200]!r} must be an absolute path without '..'")
        return path

    def canonical_bytes(self, written: frozenset[str] = frozenset()) -> bytes:
        """What the HMAC signature covers: every field but the signature (and but those the event
        did not carry and parse derived), as sorted JSON. The optional fields added later
        (`provenance`, `signer`) are covered only when set, so that events signed before they
        existed verify as they were; `written`: those of them a signer that dumps every field wrote
        empty (`"provenance": null`, `"signer": ""`)."""
        unset = {name for name in OPTIONAL_FIELDS if not getattr(self, name)} - written
        exclude = {"signature", *self._derived, *unset}
        return json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()

    def _mac(self, key: bytes, written: frozenset[str] = frozenset()) -> str:
        return hmac.new(key, self.canonical_bytes(written), hashlib.sha256).hexdigest()

    def signed(self, key: bytes | None, signer: str = "") -> ReleaseEvent:
        """A copy signed with `key` (unchanged when no key is configured); by the named `signer`, whose
        events are authored by it, when one is given."""
        event = self.model_copy(update={"signer": signer, "author": signer}) if signer else self
        return event.model_copy(update={"signature": event._mac(key)}) if key else event

    def check_signature(self, key: bytes | None, signers: Mapping[str, bytes] | None = None) -> None:
        """Refuse an event whose HMAC-SHA256 signature is missing or wrong: by its named signer's key
        (whose events it must author), else by the shared release key when one is configured."""
        if self.signer:
            named = (signers or {}).get(self.signer)
            if named is None:
                raise InvalidEvent(f"unknown signer {self.signer!r}: not one of the configured release signers")
            if self.author != self.signer:
                raise InvalidEvent(
                    f"author {self.author[:80]!r} is not its signer {self.signer!r}: a signer authors its own events"
                )
            key = named
        if not key:
            return
        if not any(hmac.compare_digest(self.signature, self._mac(key, written)) for written in SIGNED_FORMS):
            raise InvalidEvent(
                "bad signature: the event is not signed with the configured release key"
                if self.signature
                else "unsigned event: a release key is configured"
            )

    def to_proto(self) -> events_pb2.ReleaseEvent:
        data = self.model_dump(exclude={"mode", "provenance"})
        return events_pb2.ReleaseEvent(
            **data,
            mode=events_pb2.ReleaseMode.Value(f"RELEASE_MODE_{self.mode.name}"),
            provenance=self.provenance.to_proto() if self.provenance else None,
        )

    def content_digest(self) -> str:
        """The version's identity by content: sha256 over every artifact's name and sha256."""
        return content_digest(self.sha256)

    @classmethod
    def from_proto(cls, msg: events_pb2.ReleaseEvent, derived_id: str = "") -> ReleaseEvent:
        mode = events_pb2.ReleaseMode.Name(msg.mode).removeprefix("RELEASE_MODE_").lower()
        return cls(
            event_id=msg.event_id or derived_id or uuid.uuid4().hex,
            model=msg.model,
            version=msg.version,
            label=msg.label,
            artifact_uri=msg.artifact_uri,
            sha256=dict(msg.sha256),
            mode=ReleaseMode(mode) if mode != "unspecified" else ReleaseMode.SWAP,
            share_percent=msg.share_percent,
            author=msg.author,
            reason=msg.reason,
            signer=msg.signer,
            signature=msg.signature,
            created_at=msg.created_at or (0.0 if derived_id else time.time()),
            provenance=Provenance.from_proto(msg.provenance) if msg.HasField("provenance") else None,
        )

    @classmethod
    def parse(cls, payload: bytes, content_type: str, place: str = "") -> ReleaseEvent:
        """Decode a release event from either wire form; raise InvalidEvent with the reason.

        An event read from the log (`place`: its topic, partition and offset) that carries no
        `event_id` gets one derived from its bytes and place, and `created_at` 0 when absent: the
        same message always parses to the same event, so a replay is recognised as one."""
        if len(payload) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"release event is {len(payload)} bytes; at most {MAX_EVENT_BYTES} are read")
        derived_id = f"derived-{hashlib.sha256(payload + place.encode()).hexdigest()[:40]}" if place else ""
        try:
            if content_type == topics.CONTENT_TYPE_PROTOBUF:
                return cls.from_proto(events_pb2.ReleaseEvent.FromString(payload), derived_id)
            try:
                data = json.loads(payload)
            except ValueError as err:
                raise InvalidEvent(f"invalid release event: not JSON ({err})") from err
            derived = frozenset({"event_id", "created_at"} - set(data)) if derived_id and isinstance(data, dict) else frozenset()
            if derived:
                data = {"event_id": derived_id, "created_at": 0.0} | data
            event = cls.model_validate(data)
            event._derived = derived
            return event
        except ValidationError as err:
            raise InvalidEvent(f"invalid release event: {summarize(err)}") from err
        except InvalidEvent:
            raise
        except Exception as err:  # protobuf DecodeError and friends
            raise InvalidEvent(f"undecodable release event: {err}") from err


def content_digest(sha256: dict[str, str]) -> str:
    """One digest for a set of files: sha256 over the sorted `name sha256` lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(sha256.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_digests(directory: Path) -> dict[str, str]:
    """sha256 of every regular file of a model directory, by name."""
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
