"""Every Kafka topic, header and key convention of the mesh, in one place."""

from __future__ import annotations

from dataclasses import dataclass

GENERATE_REQUESTS = "llmesh.generate.requests"  # Kafka clients -> tokenize (GenerateTask: text)
INFER_REQUESTS = "llmesh.infer.requests"  # gateway, tokenize -> infer (InferTask: token ids)
REPLIES_PREFIX = "llmesh.replies."  # infer -> one gateway (TextChunk); + gateway id
GENERATE_RESULTS = "llmesh.generate.results"  # gateway -> eval (GenerationRecord)
RELEASES = "llmesh.releases"  # operators -> infer/tokenize (ReleaseEvent, protobuf or JSON); compacted
MODEL_STATUS = "llmesh.model.status"  # infer -> anyone (ModelStatusEvent)
DEAD_LETTER = "llmesh.dlq"  # original payload + reason headers
SHADOW_RESULTS = "llmesh.shadow.results"  # infer -> eval (TextChunk of a shadow candidate)
EVAL_DECISIONS = "llmesh.eval.decisions"  # eval -> anyone (PolicyDecision)
INFER_CANCELS = "llmesh.infer.cancels"  # gateway -> every infer replica (CancelTask)
FEEDBACK = "llmesh.feedback"  # gateway -> eval (FeedbackEvent)
PROMPTS = "llmesh.prompts"  # operators -> gateways (PromptRelease JSON: templates per scenario); never compacted
AUDIT = "llmesh.audit"  # eval -> anyone (AuditRecord, the audit trail in chain order); never compacted
SHADOW_SUFFIX = ".shadow"  # a mirrored request's id is the primary's id plus this


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    retention_ms: int = 0  # 0: the broker's default; -1: for ever


# Partition counts are final: the embedded broker cannot add partitions later.
TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(GENERATE_REQUESTS, 4),
    TopicSpec(INFER_REQUESTS, 4),
    TopicSpec(GENERATE_RESULTS, 2),
    TopicSpec(RELEASES, 1, compacted=True),
    TopicSpec(MODEL_STATUS, 1),
    TopicSpec(DEAD_LETTER, 1),
    TopicSpec(SHADOW_RESULTS, 2),
    TopicSpec(EVAL_DECISIONS, 1),
    TopicSpec(INFER_CANCELS, 1),
    TopicSpec(AUDIT, 1, retention_ms=-1),
    TopicSpec(FEEDBACK, 1),
    TopicSpec(PROMPTS, 1, retention_ms=-1),  # one partition: every gateway folds the events in one order
)
REPLY_PARTITIONS = 1


def is_mesh_topic(topic: str) -> bool:
    """One of the mesh's own topics (a gateway's reply topic included): never a Kafka client's reply-to."""
    return topic.startswith(REPLIES_PREFIX) or topic in {t.name for t in TOPICS}


def reply_topic(gateway_id: str) -> str:
    return f"{REPLIES_PREFIX}{gateway_id}"


def metric_label(topic: str) -> str:
    """A topic as a metric label: every gateway's reply topic counts as one."""
    return f"{REPLIES_PREFIX}*" if topic.startswith(REPLIES_PREFIX) else topic


class Header:
    """Kafka header names (values are UTF-8 bytes)."""

    REQUEST_ID = "request-id"
    TRACEPARENT = "traceparent"
    CONTENT_TYPE = "content-type"
    SCHEMA = "schema"  # protobuf full message name, e.g. llmesh.v1.GenerateTask
    REPLY_TO = "reply-to"
    DEADLINE = "deadline"  # unix time in ms after which no one waits for the answer
    SEAL = "mesh-seal"  # HMAC of a message the mesh made itself (llmesh/common/seal.py)
    DLQ_REASON = "dlq-reason"
    DLQ_TOPIC = "dlq-original-topic"
    DLQ_PARTITION = "dlq-original-partition"
    DLQ_OFFSET = "dlq-original-offset"
    DLQ_SERVICE = "dlq-service"
    WEBHOOK_URL = "webhook-url"  # on a dead-lettered webhook delivery: where it could not be delivered
    DLQ_SIZE = "dlq-original-size"  # set when the body was cut to DLQ_BODY_LIMIT: its size in bytes
    DLQ_SHA256 = "dlq-original-sha256"  # ... and the sha256 of the whole original body


DLQ_BODY_LIMIT = 256 * 1024  # a dead letter must fit the producer's request limit (1 MiB by default)


CONTENT_TYPE_PROTOBUF = "application/x-protobuf"
CONTENT_TYPE_JSON = "application/json"

# Consumer groups: replicas of one service share work; a group per replica when each must see all.
GROUP_TOKENIZE = "llmesh-tokenize"
GROUP_INFER = "llmesh-infer"
GROUP_EVAL = "llmesh-eval"
