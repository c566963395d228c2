"""The eval service: aggregates every finished generation, joins primary and candidate answers to
the same request, scores them, and applies the promotion policy to shadow and canary candidates."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import grpc
from faststream.kafka import KafkaMessage
from google.protobuf.json_format import MessageToJson, Parse
from prometheus_client import Counter, Gauge

from llmesh.common import kafka, topics
from llmesh.common.apikeys import ApiKeyStore, Scope
from llmesh.common.audit import AuditAction, AuditEntry, AuditSource, AuditTrail
from llmesh.common.events import ReleaseEvent, ReleaseMode
from llmesh.common.feedback import FEEDBACK_DATA, FEEDBACK_INDEX, RecordedText, recorded_key
from llmesh.common.keycheck import CALLER
from llmesh.common.prompts import PromptRelease, ScenarioStore
from llmesh.common.registry import Registry
from llmesh.common.scoring import Embedder, score_pair
from llmesh.common.serving import KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.common.tasks import cancel
from llmesh.common.topics import Header
from llmesh.v1 import eval_pb2, eval_pb2_grpc, events_pb2
from services.eval.pairs import LATE, CandidateScores, PairJoin, Side, paired_sides
from services.eval.policy import PromotionPolicy, Verdict, judge
from services.eval.settings import EvalSettings
from services.eval.stats import GenerationStats
from services.eval.templates import TemplateReview
from services.eval.webhooks import Failed, Webhooks

log = logging.getLogger("llmesh.eval")
RECORDS = Counter("llmesh_eval_records_total", "Generation records consumed", ["model", "version"])
PAIRS = Counter("llmesh_eval_pairs_total", "Primary/candidate answer pairs scored", ["model", "version"])
MISSING = Counter("llmesh_eval_missing_total", "Answers whose pair never arrived", ["model"])
CANDIDATE_SCORE = Gauge(
    "llmesh_eval_candidate_score", "Candidate mean scores over the policy window", ["model", "version", "metric"]
)
EMBEDDER_LOADED = Gauge("llmesh_eval_embedder_loaded", "1 once the embedding model is in memory")
DECISIONS = Counter("llmesh_eval_decisions_total", "Policy decisions", ["model", "action"])
AUDIT_EXPORTED = Counter("llmesh_eval_audit_exported_total", "Audit trail entries published on llmesh.audit")
PENDING_APPROVALS = Gauge("llmesh_release_pending_approvals", "Releases that wait for approval", ["model"])
PENDING_AGE = Gauge(
    "llmesh_release_pending_approval_age_seconds", "How long the release that waits for approval has waited", ["model"]
)
FEEDBACK = Counter("llmesh_eval_feedback_total", "Ratings of answers, by version and rating", ["model", "version", "rating"])
AUDIT_EXPORT_S = 1.0
NOT_RECORDED = (
    "these answers were rated, but no prompt or answer was recorded: set LLMESH_RECORD_TEXTS=true on the gateways "
    "(off by default, for privacy); only requests answered after that can be exported"
)


def _background_thread() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)  # niceness is per thread on Linux
    import torch

    torch.set_num_threads(1)


class EvalService(KafkaService, eval_pb2_grpc.EvalServicer):
    name = "eval"

    def __init__(self, settings: EvalSettings) -> None:
        super().__init__(settings)
        self.settings: EvalSettings = settings
        self.stats = GenerationStats()
        self.registry = Registry.from_url(settings.redis_url)
        self.keys = ApiKeyStore(self.registry.redis)
        self.audit = AuditTrail(self.registry.redis)
        secret = settings.webhook_secret
        self.webhooks = (
            Webhooks(
                self.registry.redis,
                settings.webhook_urls,
                secret.get_secret_value().encode(),
                settings.webhook_attempts,
                self._dead_letter_webhook,
                settings.replica,
            )
            if settings.webhook_urls and secret
            else None
        )
        self.join = PairJoin(self.registry.redis, settings.join_ttl_s)
        self.scores = CandidateScores(self.registry.redis)
        self.policy = PromotionPolicy.load(settings.policy_file)
        self.templates = TemplateReview(
            ScenarioStore(self.registry.redis), self.scores, self.policy, self.audit, self._publish_prompt_release
        )
        self.embedder = Embedder()
        # Scoring is background work: one low-priority thread, so it never competes with serving.
        self.scoring_pool = ThreadPoolExecutor(1, thread_name_prefix="scoring", initializer=_background_thread)
        self.sensitive = frozenset(w.lower() for w in settings.sensitive_words)
        self._loop: asyncio.Task[None] | None = None
        opts = settings.kafka
        kafka.subscribe(
            self.broker, topics.GENERATE_RESULTS, kafka.consumer_options(opts, topics.GROUP_EVAL, control=True), self.on_record
        )
        kafka.subscribe(
            self.broker,
            topics.FEEDBACK,
            kafka.consumer_options(opts, f"{topics.GROUP_EVAL}-feedback", control=True),
            self.on_feedback,
        )
        kafka.subscribe(
            self.broker,
            topics.SHADOW_RESULTS,
            kafka.consumer_options(opts, f"{topics.GROUP_EVAL}-shadow", control=True),
            self.on_shadow,
        )

    def register(self, server: grpc.aio.Server) -> list[str]:
        eval_pb2_grpc.add_EvalServicer_to_server(self, server)
        return [eval_pb2.DESCRIPTOR.services_by_name["Eval"].full_name]

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.create_task(self._policy_loop())
        self._export = asyncio.create_task(self._export_loop())
        self._notify = asyncio.create_task(self._webhook_loop()) if self.webhooks else None
        if self.settings.preload_embedder:
            self.scoring_pool.submit(self._load_embedder)

    def _load_embedder(self) -> None:
        self.embedder.load()
        self.embedder.cosine("warm up the model", "its first pass allocates its working memory")  # before traffic
        EMBEDDER_LOADED.set(1)

    async def stop(self) -> None:
        await cancel(self._loop)
        await cancel(self._export)
        if self._notify is not None:
            await cancel(self._notify)
        await super().stop()
        self.scoring_pool.shutdown(wait=False, cancel_futures=True)
        await self.registry.close()

    # ---- inputs --------------------------------------------------------------------------------

    async def on_record(self, msg: KafkaMessage) -> None:
        record = await self.dead_letters.decode(msg, events_pb2.GenerationRecord, self.seal)
        if record is None or not self.stats.add(record):
            return
        RECORDS.labels(record.model, str(record.version)).inc()
        if record.prompt:  # the gateways record texts (LLMESH_RECORD_TEXTS): kept for the fine-tuning export
            text = RecordedText(prompt=record.prompt, answer=record.answer).model_dump_json()
            await self.registry.redis.set(recorded_key(record.request_id), text, ex=int(self.settings.record_retention_s))
        if record.shadowed:
            error = record.status_code != 0
            side = Side(record.model, record.version, record.text, record.generation_ms, error, record.scenario)
            side = replace(side, shadow_template_version=record.shadow_template_version)
            await self._join(record.request_id, "answer", side)

    async def on_feedback(self, msg: KafkaMessage) -> None:
        """A rating: counted per version and scenario, and kept (the latest per request) for the export."""
        event = await self.dead_letters.decode(msg, events_pb2.FeedbackEvent, self.seal)
        if event is None:
            return
        self.stats.add_feedback(event)
        FEEDBACK.labels(event.model, str(event.version), str(event.rating)).inc()
        expired = time.time() - self.settings.record_retention_s
        async with self.registry.redis.pipeline(transaction=True) as pipe:
            pipe.hset(FEEDBACK_DATA, event.request_id, MessageToJson(event))
            pipe.zadd(FEEDBACK_INDEX, {event.request_id: event.at})
            await pipe.execute()
        if old := await self.registry.redis.zrangebyscore(FEEDBACK_INDEX, "-inf", expired, start=0, num=100):
            await self.registry.redis.hdel(FEEDBACK_DATA, *old)
            await self.registry.redis.zrem(FEEDBACK_INDEX, *old)

    async def on_shadow(self, msg: KafkaMessage) -> None:
        chunk = await self.dead_letters.decode(msg, events_pb2.TextChunk, self.seal)
        if chunk is None:
            return
        request_id = chunk.request_id.removesuffix(topics.SHADOW_SUFFIX)
        side = Side(chunk.model, chunk.version, chunk.text, chunk.generation_ms, chunk.HasField("error"))
        await self._join(request_id, "mirror", side)

    async def _join(self, request_id: str, role: str, side: Side) -> None:
        sides = await self.join.add(request_id, role, side)
        if sides is None:
            return
        routing = await self.registry.routing(side.model)
        if sides == LATE:
            if routing.candidate:
                await self.scores.count_late(side.model, routing.candidate)
            return
        assert isinstance(sides, dict)
        if (paired := paired_sides(sides, routing)) is None:
            return  # the candidate changed since the request was made
        scored, primary, candidate = paired
        score = await asyncio.get_running_loop().run_in_executor(
            self.scoring_pool,
            partial(
                score_pair,
                time.time(),
                request_id,
                primary.text,
                candidate.text,
                latency_delta_ms=candidate.generation_ms - primary.generation_ms,
                candidate_error=candidate.error,
                embedder=self.embedder,
                sensitive=self.sensitive,
            ),
        )
        EMBEDDER_LOADED.set(int(self.embedder.loaded))
        await self.scores.add(*scored, score.as_dict())
        PAIRS.labels(scored[0], str(scored[1])).inc()

    # ---- policy --------------------------------------------------------------------------------

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.policy_interval_s)
            try:
                await self._count_missing()
                for model in await self.registry.models():
                    await self._review(model)
                    await self._watch_approval(model)
                await self.templates.review()
            except Exception:
                log.exception("policy review failed")

    async def _export_loop(self) -> None:
        """Level-triggered: whatever the trail holds past the export cursor goes to the audit topic,
        in chain order, then the cursor moves (at least once: a crash between the two, or a second
        eval replica, publishes an entry again under the same key)."""
        while True:
            try:
                done, entries = await self.audit.unexported()
                for entry in entries:
                    await self.outbox.send(entry.to_proto(), topics.AUDIT, entry.id)
                if entries:
                    await self.audit.mark_exported(done, len(entries))
                    AUDIT_EXPORTED.inc(len(entries))
                    continue
            except Exception:
                log.exception("audit export failed")
            await asyncio.sleep(AUDIT_EXPORT_S)

    async def _webhook_loop(self) -> None:
        assert self.webhooks is not None
        while True:
            try:
                if await self.webhooks.run_once():
                    continue
            except Exception:
                log.exception("webhook pass failed")
            await asyncio.sleep(AUDIT_EXPORT_S)

    async def _dead_letter_webhook(self, failed: Failed) -> None:
        headers = {
            Header.DLQ_REASON: failed.reason,
            Header.DLQ_TOPIC: topics.AUDIT,
            Header.DLQ_SERVICE: self.name,
            Header.WEBHOOK_URL: failed.url[:1024],
            Header.SCHEMA: events_pb2.AuditRecord.DESCRIPTOR.full_name,
        }
        await self.broker.publish(
            failed.entry.to_proto().SerializeToString(), topics.DEAD_LETTER, key=failed.entry.id.encode(), headers=headers
        )

    async def _count_missing(self) -> None:
        for side in await self.join.sweep():
            if scored := side.template_candidate():
                await self.scores.count_missing(*scored)
                MISSING.labels(scored[0]).inc()
                continue
            routing = await self.registry.routing(side.model)
            if routing.candidate:
                await self.scores.count_missing(side.model, routing.candidate)
                MISSING.labels(side.model).inc()

    async def candidate_stats(self, model: str) -> eval_pb2.CandidateStats | None:
        routing = await self.registry.routing(model)
        if not routing.candidate:
            return None
        window = self.policy.for_model(model).window_s
        return await self.scores.stats(model, routing.candidate, routing.candidate_mode, window)

    async def _review(self, model: str) -> None:
        stats = await self.candidate_stats(model)
        if stats is None:
            return
        for metric in ("rouge_l", "embedding_cosine", "exact_match", "error_rate"):
            CANDIDATE_SCORE.labels(model, str(stats.candidate_version), metric).set(getattr(stats, metric))
        verdict = judge(self.policy.for_model(model), stats)
        decided = f"llmesh:eval:decided:{model}:{stats.candidate_version}"
        if verdict is None or not await self.registry.redis.set(decided, verdict.action, nx=True):
            return
        await self._act(model, stats, verdict)

    async def _watch_approval(self, model: str) -> None:
        """Report the release that waits for approval, and reject it once its window closed (one eval
        replica publishes the rejection: the first to set the guard)."""
        pending = (await self.registry.desired(model)).pending
        now = time.time()
        PENDING_APPROVALS.labels(model).set(1 if pending else 0)
        PENDING_AGE.labels(model).set(now - pending.requested_at if pending else 0)
        if pending is None or now <= pending.expires_at:
            return
        if not await self.registry.redis.set(f"llmesh:eval:expired:{pending.event_id}", "1", nx=True, ex=7 * 24 * 3600):
            return
        waited = f"{(pending.expires_at - pending.requested_at) / 60:.1f}"
        reason = f"approval expired: {len(pending.approvals)} of {pending.needed} approvals in {waited} minutes"
        event = ReleaseEvent(
            model=model, version=pending.version, mode=ReleaseMode.REJECT, author="llmesh-eval policy", reason=reason
        ).signed(self.settings.release_key())
        await kafka.publish_release(self.broker, event)
        await self.audit.append(
            AuditEntry(
                id=f"{AuditAction.APPROVAL_EXPIRED}:{pending.event_id}",
                action=AuditAction.APPROVAL_EXPIRED,
                source=AuditSource.EVAL_POLICY,
                actor=event.author,
                model=model,
                version=pending.version,
                reason=reason,
                event_id=event.event_id,
                details={"released_by": pending.author, "release_event_id": pending.event_id, "mode": pending.mode},
            )
        )
        log.warning("a release waited too long for approval: rejected", extra={"model": model, "version": pending.version})

    async def _act(self, model: str, stats: eval_pb2.CandidateStats, verdict: Verdict) -> None:
        record = await self.registry.version(model, stats.candidate_version)
        if record is None:
            return
        reason = f"policy {verdict.action}: " + "; ".join(verdict.reasons)
        event = ReleaseEvent(
            model=model,
            version=stats.candidate_version,
            mode=ReleaseMode.SWAP if verdict.action == "promote" else ReleaseMode.RETIRE,
            artifact_uri=record.artifact_uri,
            sha256=record.sha256,
            author="llmesh-eval policy",
            reason=reason,
        ).signed(self.settings.release_key())
        await kafka.publish_release(self.broker, event)
        decision = events_pb2.PolicyDecision(
            model=model,
            candidate_version=stats.candidate_version,
            primary_version=(await self.registry.routing(model)).primary,
            mode=stats.mode,
            action=verdict.action,
            reasons=verdict.reasons,
            figures={
                f: getattr(stats, f)
                for f in (
                    "exact_match",
                    "token_agreement",
                    "rouge_l",
                    "embedding_cosine",
                    "latency_delta_ms",
                    "length_ratio",
                    "error_rate",
                )
            },
            samples=stats.pairs,
            release_event_id=event.event_id,
            at=time.time(),
        )
        await self.outbox.send(decision, topics.EVAL_DECISIONS, model)
        await self.audit.append(
            AuditEntry(
                id=f"{AuditAction.POLICY_DECISION}:{event.event_id}",
                action=AuditAction.POLICY_DECISION,
                source=AuditSource.EVAL_POLICY,
                actor=event.author,
                model=model,
                version=stats.candidate_version,
                reason=reason,
                event_id=event.event_id,
                details={"action": verdict.action, "mode": stats.mode, "samples": str(stats.pairs)}
                | {f: f"{v:.4g}" for f, v in decision.figures.items()},
            )
        )
        await self.registry.note(model, stats.candidate_version, record.state, reason)
        DECISIONS.labels(model, verdict.action).inc()
        log.info(
            "policy decision",
            extra={"model": model, "version": stats.candidate_version, "action": verdict.action, "reasons": verdict.reasons},
        )

    async def _publish_prompt_release(self, event: PromptRelease) -> None:
        await kafka.publish_prompt_release(self.broker, event.signed(self.settings.release_key()))

    # ---- gRPC ----------------------------------------------------------------------------------

    async def ExportExamples(
        self, request: eval_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[eval_pb2.Example]:
        """Rated answers with their recorded prompts, oldest first; refused when ratings exist but no
        text was recorded (the gateways' LLMESH_RECORD_TEXTS is off, as it is by default)."""
        ids = [str(i) for i in await self.registry.redis.zrangebyscore(FEEDBACK_INDEX, request.since or "-inf", "+inf")]
        rated = exported = 0
        for start in range(0, len(ids), 500):
            batch = ids[start : start + 500]
            ratings = await self.registry.redis.hmget(FEEDBACK_DATA, batch)
            texts = await self.registry.redis.mget([recorded_key(i) for i in batch])
            for raw, text in zip(ratings, texts, strict=True):
                event = Parse(raw, events_pb2.FeedbackEvent()) if raw else None
                if event is None or event.rating < request.min_rating or (request.model and event.model != request.model):
                    continue
                rated += 1
                if text:
                    exported += 1
                    yield _example(event, RecordedText.model_validate_json(text))
        if rated and not exported:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_RECORDED)

    async def GetReport(self, request: eval_pb2.GetReportRequest, context: grpc.aio.ServicerContext) -> eval_pb2.EvalReport:
        """With keys required, every key's usage goes only to an admin key; other callers see their own."""
        caller = CALLER.get()
        report = self.stats.report(request.model, usage_of=None if caller is None or Scope.ADMIN in caller.scopes else caller.id)
        for model in [request.model] if request.model else await self.registry.models():
            if stats := await self.candidate_stats(model):
                report.candidates.append(stats)
        report.candidates.extend(s for s in await self.templates.candidates() if not request.model or s.model == request.model)
        return report


def _example(event: events_pb2.FeedbackEvent, recorded: RecordedText) -> eval_pb2.Example:
    return eval_pb2.Example(
        request_id=event.request_id,
        model=event.model,
        version=event.version,
        scenario=event.scenario,
        template_version=event.template_version,
        prompt=recorded.prompt,
        answer=recorded.answer,
        rating=event.rating,
        label=event.label,
        comment=event.comment,
        at=event.at,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(EvalSettings, argv, "eval")
    return asyncio.run(run_service(EvalService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
