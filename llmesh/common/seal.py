"""The mesh seals the messages it makes itself (tasks for infer, replies, shadow results, generation
records, status events, cancels) with an HMAC-SHA256 under the mesh key, and every reader checks
the seal before it trusts one. A Kafka client that may produce to a topic but lacks the key cannot
forge an answer, a score or a cancel. What is sealed: the topic (a message moved to another topic
fails), the key, the body, and the headers that steer the message (reply-to, deadline). Replays of
a sealed message are the reader's business: chunks carry a sequence number, records a request id.
See docs/security.md for the threat model."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from prometheus_client import Counter

from llmesh.common.topics import Header, metric_label

SCHEME = "v1"
SEALED_HEADERS = (Header.REPLY_TO, Header.DEADLINE)
REFUSED = Counter(
    "llmesh_mesh_messages_refused_total", "Mesh messages refused: no seal, or a seal that does not match", ["topic", "reason"]
)


class BrokenSeal(Exception):
    """The message does not carry a valid seal of the mesh key."""


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class MeshSeal:
    """Seals and checks with one key; without a key it does neither (the mesh runs unsealed, and says
    so at start-up)."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def _mac(self, topic: str, key: bytes, body: bytes, headers: Mapping[str, object]) -> str:
        mac = hmac.new(self.key or b"", digestmod=hashlib.sha256)
        for part in (SCHEME.encode(), topic.encode(), key, hashlib.sha256(body).digest()):
            mac.update(len(part).to_bytes(4, "big") + part)
        for name in SEALED_HEADERS:
            value = _text(headers.get(name, "")).encode()
            mac.update(len(value).to_bytes(4, "big") + value)
        return f"{SCHEME}={mac.hexdigest()}"

    def headers(self, topic: str, key: bytes, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        """`headers` with the seal of the message added (unchanged without a key)."""
        if self.key is None:
            return headers
        return headers | {Header.SEAL: self._mac(topic, key, body, headers)}

    def check(self, topic: str, key: bytes | None, body: bytes, headers: Mapping[str, object]) -> None:
        """Raise BrokenSeal (and count it) unless the message carries this key's seal."""
        if self.key is None:
            return
        seal = _text(headers.get(Header.SEAL, ""))
        if not seal:
            reason = "unsealed"
        elif not hmac.compare_digest(seal, self._mac(topic, key or b"", body, headers)):
            reason = "bad seal"
        else:
            return
        REFUSED.labels(metric_label(topic), reason).inc()
        raise BrokenSeal(f"{reason}: the message is not sealed with the mesh key")
