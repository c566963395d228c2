"""Kafka wiring shared by the services: a low-latency FastStream broker, topic creation, message
headers, and the dead-letter publisher."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from google.protobuf.message import DecodeError, Message
from prometheus_client import Histogram

from llmesh.common import tansu_compat, topics
from llmesh.common.events import ReleaseEvent
from llmesh.common.polling import AdaptivePolling
from llmesh.common.prompts import PromptRelease
from llmesh.common.seal import BrokenSeal, MeshSeal
from llmesh.common.settings import KafkaSettings
from llmesh.common.topics import Header
from llmesh.v1 import events_pb2

log = logging.getLogger("llmesh.kafka")
HOP_SECONDS = Histogram(
    "llmesh_kafka_hop_seconds",
    "From a message's produce time to its handler starting (broker, polling and the consumer's queue)",
    ["topic"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)
M = TypeVar("M", bound=Message)
tansu_compat.apply()


SASL_SECURITY: dict[str, Callable[..., BaseSecurity]] = {
    "PLAIN": SASLPlaintext,
    "SCRAM-SHA-256": SASLScram256,
    "SCRAM-SHA-512": SASLScram512,
}


def broker_security(settings: KafkaSettings) -> BaseSecurity | None:
    """KafkaSettings.client_kwargs() as FastStream's KafkaBroker takes it (it hands aiokafka the same)."""
    kwargs = settings.client_kwargs()
    context, tls = kwargs.get("ssl_context"), settings.security_protocol in ("SSL", "SASL_SSL")
    if mechanism := kwargs.get("sasl_mechanism"):
        return SASL_SECURITY[mechanism](
            kwargs["sasl_plain_username"], kwargs["sasl_plain_password"], ssl_context=context, use_ssl=tls
        )
    return BaseSecurity(ssl_context=context, use_ssl=True) if tls else None


def make_broker(settings: KafkaSettings, client_id: str) -> KafkaBroker:
    """A broker tuned for latency: no linger, leader-only acks, no auto-created topics."""
    return KafkaBroker(
        settings.bootstrap,
        security=broker_security(settings),
        client_id=client_id,
        linger_ms=0,
        acks=1,
        enable_idempotence=False,  # InitProducerId v0 (aiokafka) is not supported by the embedded broker
        request_timeout_ms=settings.request_timeout_ms,
        allow_auto_create_topics=False,
        graceful_timeout=None,
        apply_types=False,
        logger=None,  # handlers log for themselves, as JSON
    )


def consumer_options(
    settings: KafkaSettings, group_id: str | None, *, from_start: bool = False, control: bool = False
) -> dict[str, Any]:
    """Subscriber arguments; short sessions because the embedded broker delays each join by half of one.
    `control`: off the request path, so a slow poll (see KafkaSettings)."""
    options: dict[str, Any] = {
        "fetch_max_wait_ms": settings.control_fetch_max_wait_ms if control else settings.fetch_max_wait_ms,
        "auto_offset_reset": "earliest" if from_start else "latest",
    }
    if group_id:
        options |= {
            "group_id": group_id,
            "session_timeout_ms": settings.session_timeout_ms,
            "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        }
    return options


async def ensure_topics(settings: KafkaSettings, extra: Mapping[str, int] | None = None) -> list[str]:
    """Create every mesh topic that does not exist yet; returns the names created. (Where the topics
    are made beforehand, as Strimzi KafkaTopics, this needs only Describe on them.)"""
    specs = [NewTopic(t.name, t.partitions, 1, topic_configs=_configs(t)) for t in topics.TOPICS]
    specs += [NewTopic(name, parts, 1) for name, parts in (extra or {}).items()]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="llmesh-admin", **settings.client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another service raced us
                await admin.create_topics(missing)
        return [s.name for s in missing]
    finally:
        await admin.close()


def _configs(spec: topics.TopicSpec) -> dict[str, str]:
    configs = {"cleanup.policy": "compact"} if spec.compacted else {}
    return configs | ({"retention.ms": str(spec.retention_ms)} if spec.retention_ms else {})


MessageHandler = Callable[[KafkaMessage], Awaitable[None]]


def subscribe(
    broker: KafkaBroker, topic: str, options: dict[str, Any], handler: MessageHandler, polling: AdaptivePolling | None = None
) -> Any:
    """Register `handler` for `topic`; it receives the whole message (body, headers, record).
    With `polling`, the consumer is on the request path: it polls fast while messages flow."""

    label = topics.metric_label(topic)

    async def on_message(_body: Any) -> None:
        if polling is not None:
            polling.touch()
        msg: KafkaMessage = broker.context.get_local("message")
        HOP_SECONDS.labels(label).observe(max(0.0, time.time() - msg.raw_message.timestamp / 1000))  # type: ignore[union-attr]
        try:
            await handler(msg)
        except Exception:
            log.exception("handler failed", extra={"topic": topic})

    subscriber = broker.subscriber(topic, **options)
    subscriber(on_message)
    if polling is not None:
        polling.track(subscriber)
    return subscriber


def headers_for(message: Message, request_id: str = "", **extra: str) -> dict[str, str]:
    """Standard headers of a protobuf payload."""
    out = {
        Header.CONTENT_TYPE: topics.CONTENT_TYPE_PROTOBUF,
        Header.SCHEMA: message.DESCRIPTOR.full_name,
    }
    if request_id:
        out[Header.REQUEST_ID] = request_id
    out.update({k: v for k, v in extra.items() if v})
    return out


PUBLISH_ATTEMPTS = 4


class Outbox:
    """Publishes the mesh's own protobuf messages, each sealed with the mesh key (llmesh/common/seal.py)."""

    def __init__(self, broker: KafkaBroker, seal: MeshSeal) -> None:
        self.broker, self.seal = broker, seal

    async def send(
        self, message: Message, topic: str, key: str, *, request_id: str = "", no_confirm: bool = False, **extra: str
    ) -> None:
        body, raw_key = message.SerializeToString(), key.encode()
        headers = self.seal.headers(topic, raw_key, body, headers_for(message, request_id, **extra))
        await self.broker.publish(body, topic, key=raw_key, headers=headers, no_confirm=no_confirm)

    async def task(self, task: events_pb2.InferTask, reply_to: str, traceparent: str, *, wait: bool = True) -> None:
        """An InferTask to infer, keyed by request id, with where to answer, its trace and its deadline.
        A retriable broker error (a partition's leader moved, after a broker restart) is retried a few
        times: infer runs a task once however often it arrives (its lease claim)."""
        extra = {Header.REPLY_TO: reply_to, Header.TRACEPARENT: traceparent, Header.DEADLINE: str(task.deadline_unix_ms or "")}
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.send(
                    task, topics.INFER_REQUESTS, task.request_id, request_id=task.request_id, no_confirm=not wait, **extra
                )
                return
            except KafkaError as err:
                if not err.retriable or attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                log.warning("publish failed; retrying", extra={"error": repr(err), "request_id": task.request_id})
                await asyncio.sleep(0.2 * 2**attempt)


def expired(msg: KafkaMessage) -> bool:
    """The message's deadline header has passed: its answer would go to no one."""
    deadline = header(msg, Header.DEADLINE)
    return deadline.isdigit() and int(deadline) <= time.time() * 1000


def header(msg: KafkaMessage, name: str) -> str:
    value = msg.headers.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


class DeadLetters:
    """Sends a message that cannot be processed to the dead-letter topic, byte for byte, with why."""

    def __init__(self, broker: KafkaBroker, service: str) -> None:
        self.broker = broker
        self.service = service

    async def send(self, msg: KafkaMessage, reason: str) -> None:
        """An oversized message (the reason it was refused, often) goes with its body cut to
        DLQ_BODY_LIMIT, its size and digest, and its headers and key cut short: it still arrives."""
        record = msg.raw_message
        raw = record if not isinstance(record, tuple) else record[0]
        headers = {
            k[:256]: (v.decode(errors="replace") if isinstance(v, bytes) else str(v))[:1024]
            for k, v in list(msg.headers.items())[:32]
        }
        body = msg.body
        if len(body) > topics.DLQ_BODY_LIMIT:
            headers |= {Header.DLQ_SIZE: str(len(body)), Header.DLQ_SHA256: hashlib.sha256(body).hexdigest()}
            body = body[: topics.DLQ_BODY_LIMIT]
        headers |= {
            Header.DLQ_REASON: reason[:2000],
            Header.DLQ_TOPIC: raw.topic,
            Header.DLQ_PARTITION: str(raw.partition),
            Header.DLQ_OFFSET: str(raw.offset),
            Header.DLQ_SERVICE: self.service,
        }
        log.warning("dead-lettered", extra={"reason": reason, "topic": raw.topic, "offset": raw.offset})
        await self.broker.publish(body, topics.DEAD_LETTER, key=(raw.key or b"")[:1024] or None, headers=headers)

    async def decode(self, msg: KafkaMessage, schema: type[M], seal: MeshSeal | None = None) -> M | None:
        """The protobuf payload of `msg`, or None once it has been dead-lettered with the reason.
        With `seal`: a message the mesh made itself, refused unless it carries the mesh key's seal."""
        if seal is not None:
            raw = msg.raw_message
            record = raw if not isinstance(raw, tuple) else raw[0]
            try:
                seal.check(record.topic, record.key, msg.body, msg.headers)
            except BrokenSeal as err:
                await self.send(msg, f"{schema.DESCRIPTOR.name} refused: {err}")
                return None
        try:
            return schema.FromString(msg.body)
        except DecodeError as err:
            await self.send(msg, f"undecodable {schema.DESCRIPTOR.name}: {err}")
            return None


def release_record(event: ReleaseEvent) -> tuple[bytes, bytes, dict[str, str]]:
    """Value, key and headers of a release event on the release topic (protobuf, keyed by model)."""
    proto = event.to_proto()
    return proto.SerializeToString(), event.model.encode(), headers_for(proto)


async def publish_release(broker: KafkaBroker, event: ReleaseEvent) -> None:
    """Publish a release event the mesh made (the gateway's Admin API, eval's policy) on the release topic."""
    value, key, headers = release_record(event)
    await broker.publish(value, topics.RELEASES, key=key, headers=headers)


def prompt_record(event: PromptRelease) -> tuple[bytes, bytes, dict[str, str]]:
    """Value, key and headers of a prompt release on the prompts topic (JSON, keyed by scenario)."""
    return event.model_dump_json().encode(), event.scenario.encode(), {Header.CONTENT_TYPE: topics.CONTENT_TYPE_JSON}


async def publish_prompt_release(broker: KafkaBroker, event: PromptRelease) -> None:
    """Publish a prompt release the mesh made (eval's policy on a shadow template) on the prompts topic."""
    value, key, headers = prompt_record(event)
    await broker.publish(value, topics.PROMPTS, key=key, headers=headers)
