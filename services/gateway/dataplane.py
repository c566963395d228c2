"""The gateway's data plane, free of any transport: one pass from a client's request to its answer.
It validates, plans traffic (primary, canary, shadow), encodes the prompt with the answering
version's tokenizer (chat messages through its chat template), admits (fleet, load, quota),
publishes the task, yields the reply chunks, and records the outcome. Failures are GenerationErrors
in the mesh's canonical status codes (gRPC's, as Kafka replies carry them); the gRPC servicer
(services/gateway/app.py) and the OpenAI-compatible HTTP API (services/gateway/http_api.py) are thin
adapters that map them to their own statuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn

import grpc
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram
from redis.typing import EncodableT, FieldT

from llmesh.common import kafka, status, topics
from llmesh.common.apikeys import ApiKey
from llmesh.common.chat import ChatMessage
from llmesh.common.content import AnswerFilter, ContentWatch, Hit, Scanner
from llmesh.common.feedback import FeedbackInput, RequestOwner, request_key
from llmesh.common.polling import AdaptivePolling
from llmesh.common.prompts import ScenarioStore
from llmesh.common.registry import Registry, Route
from llmesh.common.serving import InFlight
from llmesh.common.tokenizers import InvalidPrompt, TokenizerCatalog, UnknownVersion, VersionTokenizer
from llmesh.common.validation import (
    InvalidRequest,
    SamplingValues,
    bounded,
    parse_model_ref,
    shown,
    validate_prompt,
    validate_text,
)
from llmesh.v1 import common_pb2, events_pb2, gateway_pb2
from services.gateway.auth import QuotaExceeded, Quotas
from services.gateway.fleetgate import FleetGate
from services.gateway.replies import PendingReplies, ReplyTimeout
from services.gateway.settings import GatewaySettings
from services.gateway.traffic import TemplatePlan, TrafficPlan, plan, plan_template

REQUESTS = Counter("llmesh_gateway_requests_total", "Generate requests by outcome", ["model", "version", "code", "stream"])
LATENCY = Histogram(
    "llmesh_gateway_request_seconds",
    "Time to the last chunk",
    ["stream"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FIRST_CHUNK = Histogram(
    "llmesh_gateway_first_chunk_seconds", "Time to the first text chunk", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
)
WAITING = Gauge("llmesh_gateway_waiting_requests", "Requests waiting for replies")
SCENARIO_TOKENS = Counter(
    "llmesh_gateway_scenario_tokens_total",
    "Tokens spent on released scenarios (prompt and completion), per template version",
    ["scenario", "template_version", "kind"],
)
SCENARIO_BUDGET = Gauge(
    "llmesh_scenario_token_budget_per_hour", "The serving template version's token budget per hour (0: none)", ["scenario"]
)
SENSITIVE = Counter(
    "llmesh_gateway_sensitive_hits_total",
    "Content-list hits in prompts and answers (LLMESH_CONTENT_RULES_FILE); divide by requests for a rate",
    ["model", "version", "scenario", "list", "action", "where"],
)
log = logging.getLogger("llmesh.gateway")
RECORDS_IN_FLIGHT = 1024
CANCEL_SETTLE_S = 5.0  # how long a cancelled request waits for infer to count what it generated

Prompt = str | Sequence[ChatMessage]  # text as sent, or chat messages for the version's chat template


class GenerationError(Exception):
    """A request refused or failed, with a canonical status code and a message for the client;
    `retry_after_s` when retrying later will help (a quota, the gateway's limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, bounded(message), retry_after_s

    def trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return (("retry-after-ms", str(math.ceil(self.retry_after_s * 1000))),)


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asks for, whatever the transport."""

    model: str  # NAME (the primary, or a canary) or NAME@VERSION (pinned: no canary, no shadow)
    prompt: Prompt
    sampling: SamplingValues
    stream: bool
    caller: ApiKey | None = None  # the checked key, when keys are required
    client_key: str = ""  # the key the client presented (canary stickiness), checked or not
    traceparent: str | None = None
    scenario: str = ""  # a released scenario (its template renders the prompt), or a label only
    variables: Mapping[str, object] = field(default_factory=dict)  # the scenario template's
    timeout_s: float | None = None  # what is left of the client's deadline


@dataclass(frozen=True)
class Rendered:
    """A request after its scenario: the prompt its template version rendered, and a shadow's."""

    request: GenerationRequest
    template_version: int = 0
    shadow_template_version: int = 0
    shadow_prompt: str = ""


@dataclass
class Outcome:
    route: Route
    request_id: str
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    first_chunk_ms: float = 0.0
    code: grpc.StatusCode = grpc.StatusCode.OK
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    shadowed: bool = False
    texts: list[str] = field(default_factory=list)  # kept only when shadowed: eval compares the answers
    generation_ms: float = 0.0
    api_key_id: str = ""
    key: ApiKey | None = None  # the caller's key, when keys are required
    held_tokens: int = 0  # of the key's token budget, until the answer is in
    prompt_tokens: int = 0
    scenario: str = ""
    template_version: int = 0  # the scenario's template version that rendered the prompt
    shadow_template_version: int = 0  # a shadow template version whose prompt was mirrored
    stopped: bool = False  # the gateway stopped the answer before its end (infer must stop too)
    recorded_prompt: str = ""  # with record_texts: the prompt as the model saw it ...
    recorded_answer: list[str] = field(default_factory=list)  # ... and the answer as the client got it


class DataPlane:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        quotas: Quotas,
        outbox: kafka.Outbox,
        polling: AdaptivePolling,
        reply_topic: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.quotas = quotas
        self.outbox = outbox
        self.polling = polling
        self.reply_topic = reply_topic
        self.catalog = TokenizerCatalog(registry)
        self.scenarios = ScenarioStore(registry.redis)
        self.pending = PendingReplies()
        self.fleet = FleetGate(registry.redis, self.pending)
        self.records = InFlight(RECORDS_IN_FLIGHT)  # published after the answer left, off the client's path
        self.content = ContentWatch(settings.content_rules_file)

    # ---- catalogue -------------------------------------------------------------------------

    async def models(self) -> list[gateway_pb2.ModelInfo]:
        return [await self.model(name) for name in await self.registry.models()]

    async def model(self, name: str, with_history: bool = False) -> gateway_pb2.ModelInfo:
        if not name:
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        if name not in await self.registry.models():
            raise GenerationError(grpc.StatusCode.NOT_FOUND, f"model {shown(name)} is not registered")
        routing, pending = await self.registry.routing(name), (await self.registry.desired(name)).pending
        info = gateway_pb2.ModelInfo(
            name=name,
            primary_version=routing.primary,
            previous_version=routing.previous,
            pending=pending.to_proto() if pending else None,
        )
        for r in await self.registry.versions(name):
            info.versions.add(
                version=r.version,
                state=r.state_enum(),
                label=r.label,
                artifact_uri=r.artifact_uri,
                reason=r.reason,
                updated_at=r.updated_at,
                author=r.author,
                provenance=r.provenance.to_proto() if r.provenance else None,
            )
        for entry in await self.registry.history(name) if with_history else []:
            info.history.add(
                at=entry.at,
                version=entry.version,
                state=common_pb2.VersionState.Value(f"VERSION_STATE_{entry.state}"),
                reason=entry.reason,
            )
        return info

    # ---- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[tuple[Outcome, events_pb2.TextChunk], None]:
        """The request's reply chunks, the last one final; GenerationError when refused or failed.
        A cancelled consumer (client gone) cancels the generation in infer."""
        request_id = uuid.uuid4().hex
        rendered = await self._from_scenario(request, request_id)
        request = rendered.request
        sampling = self._validate(request)
        traffic = await self._plan(request, request_id)
        route = traffic.answer
        # one mirror a request: the model's candidate first (its policy), else the scenario's shadow template
        shadow_template = rendered.shadow_template_version if traffic.shadow is None else 0
        outcome = Outcome(route, request_id, request.stream, scenario=request.scenario)
        outcome.shadowed = traffic.shadow is not None or bool(shadow_template)
        outcome.template_version, outcome.shadow_template_version = rendered.template_version, shadow_template
        scanner = self.content.scanner(route.model, request.scenario)
        prompt = self._screen_prompt(scanner, request.prompt, outcome) if scanner else request.prompt
        if self.settings.record_texts:
            outcome.recorded_prompt = _prompt_text(prompt)
        prompt_ids = await self._encode(route, prompt)
        outcome.prompt_tokens = len(prompt_ids)
        await self._admit(request, outcome, len(prompt_ids) + sampling.max_tokens)
        timeout = min(request.timeout_s or math.inf, self.settings.request_timeout_s)
        task = events_pb2.InferTask(
            request_id=outcome.request_id,
            model=route.model,
            version=route.version,
            prompt_ids=prompt_ids,
            sampling=sampling,
            stream=request.stream,
            deadline_unix_ms=int((time.time() + timeout) * 1000),
        )
        self.pending.open(outcome.request_id)
        WAITING.inc()
        try:
            trace = status.traceparent(request.traceparent)  # one trace for the request and its mirror
            await self._publish(task, trace, self.reply_topic)
            if traffic.shadow is not None:
                await self._mirror(task, traffic.shadow.version, prompt, trace)
            elif shadow_template:  # the same model version and sampling: only the template differs
                shadow_prompt = scanner.scan(rendered.shadow_prompt)[0] if scanner else rendered.shadow_prompt
                await self._mirror(task, route.version, shadow_prompt, trace)
            deadline = asyncio.get_running_loop().time() + timeout
            answer = AnswerFilter(scanner) if scanner else None
            async for chunk in self.pending.chunks(outcome.request_id, deadline):
                if chunk.HasField("error"):
                    outcome.code = status.status_code(chunk.error)
                    raise GenerationError(outcome.code, chunk.error.message)
                if not outcome.first_chunk_ms:
                    outcome.first_chunk_ms = (time.perf_counter() - outcome.started) * 1000
                    FIRST_CHUNK.observe(outcome.first_chunk_ms / 1000)
                if chunk.final:
                    outcome.usage = chunk.usage
                    outcome.generation_ms = chunk.generation_ms
                if outcome.shadowed:
                    outcome.texts.append(chunk.text)  # as generated: eval compares the two models' answers
                if answer is not None:
                    self._screen_answer(answer, chunk, outcome)
                if self.settings.record_texts:
                    outcome.recorded_answer.append(chunk.text)
                yield outcome, chunk
        except ReplyTimeout:
            outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise GenerationError(outcome.code, f"no answer from the mesh within {timeout:.1f}s") from None
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (GeneratorExit: its transport closed us)
            outcome.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if outcome.code == grpc.StatusCode.CANCELLED or outcome.stopped:
                await self.records.spawn(self._after_cancel(outcome))
            else:
                self.pending.close(outcome.request_id)
                WAITING.dec()
                await self.records.spawn(self._record(outcome, time.perf_counter() - outcome.started))

    async def _from_scenario(self, request: GenerationRequest, request_id: str) -> Rendered:
        """A released scenario's request as the model gets it: the prompt its template version renders
        (the canary's for a share of clients; NAME@N pins version N), its model, its sampling
        defaults; and a shadow template version's prompt for a share of requests."""
        if not request.scenario:
            if request.variables:
                raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, "variables need a scenario (whose template uses them)")
            return Rendered(request)
        name, pinned = _scenario_ref(request.scenario)
        try:
            state = await self.scenarios.get(name)
        except InvalidRequest as err:
            raise GenerationError(grpc.StatusCode.INTERNAL, str(err)) from None
        if state is None or not state.primary:
            if request.variables or not request.prompt or pinned:
                raise GenerationError(grpc.StatusCode.NOT_FOUND, f"scenario {shown(name)} is not released")
            return Rendered(request)  # a label only: usage, feedback and content lists per scenario
        if request.prompt:
            message = f"scenario {state.name} renders its prompt from its template: send variables, not a prompt"
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, message)
        if pinned:  # no canary, no shadow
            if pinned not in state.versions:
                raise GenerationError(grpc.StatusCode.NOT_FOUND, f"scenario {name} has no template version {pinned}")
            templates = TemplatePlan(state.versions[pinned])
        else:
            sticky = request.client_key or _digest(json.dumps(request.variables, sort_keys=True, default=str))
            templates = plan_template(state, sticky, request_id)
        chosen = templates.answer
        if request.model and request.model != chosen.model:
            message = f"scenario {state.name} is bound to model {chosen.model}; leave model empty"
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, message)
        try:
            prompt = chosen.template.render(request.variables)
        except InvalidRequest as err:
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, f"scenario {state.name} v{chosen.version}: {err}") from None
        shadow, shadow_prompt = templates.shadow, ""
        if shadow is not None:
            try:
                shadow_prompt = shadow.template.render(request.variables)
            except InvalidRequest:  # the client's request is valid for the version that answers it
                log.warning("a shadow template could not render", extra={"scenario": state.name, "version": shadow.version})
                shadow = None
        SCENARIO_BUDGET.labels(state.name).set(state.budget())
        sampling = request.sampling.with_defaults(**chosen.sampling.model_dump())
        return Rendered(
            replace(request, scenario=name, model=chosen.model, prompt=prompt, sampling=sampling),
            chosen.version,
            shadow.version if shadow else 0,
            shadow_prompt,
        )

    def _screen_prompt(self, scanner: Scanner, prompt: Prompt, outcome: Outcome) -> Prompt:
        """The prompt with what redact lists found masked; refused when a refuse list found anything."""
        screened: Prompt
        if isinstance(prompt, str):
            screened, hits = scanner.scan(prompt)
        else:
            scans = [scanner.scan(message.text()) for message in prompt]
            hits = [hit for _, found in scans for hit in found]
            screened = [m.model_copy(update={"content": text}) for m, (text, _) in zip(prompt, scans, strict=True)]
        self._count(scanner, hits, outcome, "prompt")
        if refusal := scanner.refusal(hits):
            self._refuse(outcome, grpc.StatusCode.INVALID_ARGUMENT, f"the prompt holds text that {refusal}")
        return screened

    def _screen_answer(self, answer: AnswerFilter, chunk: events_pb2.TextChunk, outcome: Outcome) -> None:
        """Mask or stop the answer as it streams (the last characters wait for the next chunk)."""
        seen = len(answer.hits)
        chunk.text = answer.feed(chunk.text) + (answer.finish() if chunk.final else "")
        found = answer.hits[seen:]
        scanner = answer.scanner
        self._count(scanner, found, outcome, "answer")
        if refusal := scanner.refusal(found):
            outcome.code, outcome.stopped = grpc.StatusCode.FAILED_PRECONDITION, not chunk.final
            raise GenerationError(outcome.code, f"the answer was stopped: it held text that {refusal}")

    @staticmethod
    def _count(scanner: Scanner, hits: list[Hit], outcome: Outcome, where: str) -> None:
        route = outcome.route
        # a metric label only for scenarios the operators named: released ones, or those the rules name
        scenario = outcome.scenario if outcome.template_version else scanner.scenario_label(outcome.scenario)
        for hit in hits:
            SENSITIVE.labels(route.model, str(route.version), scenario, hit.list, hit.action.value, where).inc()

    def _validate(self, request: GenerationRequest) -> events_pb2.ResolvedSampling:
        try:
            parse_model_ref(request.model)
            if isinstance(request.prompt, str):
                validate_prompt(request.prompt, self.settings)
            else:
                self._validate_messages(request.prompt)
            return request.sampling.resolve(self.settings)
        except InvalidRequest as err:
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None

    def _validate_messages(self, messages: Sequence[ChatMessage]) -> None:
        if not messages:
            raise InvalidRequest("messages must hold at least one message")
        for n, message in enumerate(messages):
            validate_text(message.text(), self.settings, f"messages[{n}].content")
        chars = sum(len(message.text()) for message in messages)
        if chars > self.settings.max_prompt_chars:
            raise InvalidRequest(f"messages hold {chars} characters; the limit is {self.settings.max_prompt_chars}")

    async def _plan(self, request: GenerationRequest, request_id: str) -> TrafficPlan:
        if "@" in request.model:  # a pinned version: no canary, no shadow
            if pinned := await self.registry.resolve(request.model):
                return TrafficPlan(pinned)
            raise GenerationError(grpc.StatusCode.NOT_FOUND, await self._unknown_model_message(request.model))
        routing = await self.registry.routing(request.model)
        if not routing.primary:
            raise GenerationError(grpc.StatusCode.NOT_FOUND, await self._unknown_model_message(request.model))
        sticky = ""
        if routing.candidate_mode == "canary":  # only a canary needs the sticky key
            sticky = request.client_key or _digest(_prompt_text(request.prompt))
        return plan(request.model, routing, sticky, request_id)

    async def _encode(self, route: Route, prompt: Prompt) -> list[int]:
        try:
            return _encode(await self.catalog.get(route.model, route.version), prompt, self.settings.max_prompt_chars)
        except InvalidPrompt as err:
            raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except UnknownVersion as err:
            raise GenerationError(grpc.StatusCode.NOT_FOUND, str(err)) from None

    async def _admit(self, request: GenerationRequest, outcome: Outcome, held: int) -> None:
        """A live replica to serve it, room at this gateway, and the key's quota: else refused,
        counted, before any work is done."""
        if down := await self.fleet.why_down(outcome.route):
            self._refuse(outcome, grpc.StatusCode.UNAVAILABLE, down)
        if len(self.pending) >= self.settings.max_waiting:  # before the quota: a refused request costs the key nothing
            limit = f"the gateway is at its limit of {self.settings.max_waiting} requests; retry later"
            self._refuse(outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, limit, retry_after_s=1.0)
        if key := request.caller:
            outcome.key, outcome.api_key_id = key, key.id
            try:
                await self.quotas.admit(key, held)
            except QuotaExceeded as err:
                self._refuse(outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), err.retry_after_s)
            outcome.held_tokens = held
        elif request.client_key:  # keys not required: the sticky canary key, not checked
            outcome.api_key_id = _digest(request.client_key)[:16]

    def _refuse(self, outcome: Outcome, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> NoReturn:
        outcome.code = code
        REQUESTS.labels(outcome.route.model, str(outcome.route.version), code.name, str(outcome.stream).lower()).inc()
        raise GenerationError(code, message, retry_after_s)

    async def _after_cancel(self, outcome: Outcome) -> None:
        """The client cancelled or went away (or the answer was stopped): tell infer to stop, wait for its count of the tokens it
        generated, and charge the key exactly those. A unary answer arrives whole only at its end, so
        its count is unknown: it is charged what was held (as is any request infer does not settle)."""
        elapsed = time.perf_counter() - outcome.started
        final: events_pb2.TextChunk | None = None
        try:
            why = "the answer was stopped by a content list" if outcome.stopped else "the client cancelled"
            cancel_task = events_pb2.CancelTask(request_id=outcome.request_id, reason=why)
            await self.outbox.send(cancel_task, topics.INFER_CANCELS, outcome.request_id, request_id=outcome.request_id)
            deadline = asyncio.get_running_loop().time() + CANCEL_SETTLE_S
            async for chunk in self.pending.chunks(outcome.request_id, deadline):
                final = chunk
        except (ReplyTimeout, KafkaError):
            log.warning("a cancelled request was not settled by infer", extra={"request_id": outcome.request_id})
        finally:
            self.pending.close(outcome.request_id)
            WAITING.dec()
        exact = final is not None and final.HasField("usage") and not final.HasField("error")
        if exact and (outcome.stream or final.finish_reason != common_pb2.FINISH_REASON_CANCELLED):  # type: ignore[union-attr]
            outcome.usage = final.usage  # type: ignore[union-attr]
        else:
            completion = max(0, outcome.held_tokens - outcome.prompt_tokens)
            outcome.usage = common_pb2.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=completion)
        await self._record(outcome, elapsed)

    async def _publish(self, task: events_pb2.InferTask, traceparent: str, reply_to: str, *, wait: bool = True) -> None:
        self.polling.touch()  # the reply will come back on the request path
        await self.outbox.task(task, reply_to, traceparent, wait=wait)

    async def _mirror(self, task: events_pb2.InferTask, version: int, prompt: Prompt, traceparent: str) -> None:
        """Fire-and-forget copy for a shadow candidate, encoded with the candidate's own tokenizer
        (and chat template); its whole answer goes to the shadow topic."""
        shadow = events_pb2.InferTask()
        shadow.CopyFrom(task)
        shadow.request_id, shadow.version, shadow.stream = task.request_id + topics.SHADOW_SUFFIX, version, False
        try:
            tokenizer = await self.catalog.get(task.model, version)
            shadow.prompt_ids[:] = _encode(tokenizer, prompt, self.settings.max_prompt_chars)
            await self._publish(shadow, traceparent, topics.SHADOW_RESULTS, wait=False)
        except Exception:  # mirroring must never fail the client's request
            log.warning("could not mirror a request to the shadow candidate", exc_info=True)

    async def _unknown_model_message(self, alias: str) -> str:
        known = ", ".join(await self.registry.models()) or "none yet"
        return bounded(f"model {shown(alias)} is not served (known models: {known}; pin a version with name@N)")

    async def _record(self, outcome: Outcome, elapsed: float) -> None:
        if outcome.key is not None:
            usage = outcome.usage
            try:
                await self.quotas.settle(outcome.key, outcome.held_tokens, usage.prompt_tokens, usage.completion_tokens)
            except Exception:  # the answer is out; a lost settlement only makes the key's budget stricter
                log.warning("could not settle the key's token budget", exc_info=True)
        route, stream = outcome.route, str(outcome.stream).lower()
        REQUESTS.labels(route.model, str(route.version), outcome.code.name, stream).inc()
        if outcome.template_version:  # released scenarios only: their names are the operators', not the clients'
            labels = (outcome.scenario, str(outcome.template_version))
            SCENARIO_TOKENS.labels(*labels, "prompt").inc(outcome.usage.prompt_tokens)
            SCENARIO_TOKENS.labels(*labels, "completion").inc(outcome.usage.completion_tokens)
        LATENCY.labels(stream).observe(elapsed)
        record = events_pb2.GenerationRecord(
            request_id=outcome.request_id,
            model=route.model,
            version=route.version,
            status_code=outcome.code.value[0],
            latency_ms=elapsed * 1000,
            first_token_ms=outcome.first_chunk_ms,
            usage=outcome.usage,
            stream=outcome.stream,
            finished_at=time.time(),
            text="".join(outcome.texts),
            shadowed=outcome.shadowed,
            api_key_id=outcome.api_key_id,
            scenario=outcome.scenario,
            generation_ms=outcome.generation_ms,
            prompt=outcome.recorded_prompt,
            answer="".join(outcome.recorded_answer),
            template_version=outcome.template_version,
            shadow_template_version=outcome.shadow_template_version,
        )
        try:
            if outcome.code == grpc.StatusCode.OK:  # the answer may be rated, by the key that asked for it
                await self._remember_owner(outcome)
            await self.outbox.send(
                record, topics.GENERATE_RESULTS, outcome.request_id, request_id=outcome.request_id, no_confirm=True
            )
        except Exception:  # a lost record must not fail the client's request
            log.warning("could not publish the generation record", exc_info=True)

    async def _remember_owner(self, outcome: Outcome) -> None:
        owner = RequestOwner(
            api_key_id=outcome.api_key_id,
            model=outcome.route.model,
            version=outcome.route.version,
            scenario=outcome.scenario,
            template_version=outcome.template_version,
        )
        async with self.registry.redis.pipeline(transaction=False) as pipe:
            fields: dict[FieldT, EncodableT] = {k: str(v) for k, v in owner.model_dump().items()}
            pipe.hset(request_key(outcome.request_id), mapping=fields)
            pipe.expire(request_key(outcome.request_id), int(self.settings.feedback_window_s))
            await pipe.execute()

    # ---- feedback ----------------------------------------------------------------------------

    async def feedback(self, given: FeedbackInput, caller: ApiKey | None) -> gateway_pb2.FeedbackResponse:
        """Publish a rating of an answer, from the key that asked for it (any caller when keys are off)."""
        raw = await self.registry.redis.hgetall(request_key(given.request_id))
        if not raw:
            window = f"{self.settings.feedback_window_s / 3600:g} hours"
            raise GenerationError(grpc.StatusCode.NOT_FOUND, f"no answered request {given.request_id} in the last {window}")
        owner = RequestOwner.model_validate(raw)
        if caller is not None and caller.id != owner.api_key_id:
            raise GenerationError(grpc.StatusCode.PERMISSION_DENIED, "only the key that made a request may rate its answer")
        event = events_pb2.FeedbackEvent(
            request_id=given.request_id,
            model=owner.model,
            version=owner.version,
            scenario=owner.scenario,
            template_version=owner.template_version,
            api_key_id=owner.api_key_id,
            rating=given.rating,
            label=given.label,
            comment=given.comment,
            at=time.time(),
        )
        await self.outbox.send(event, topics.FEEDBACK, given.request_id, request_id=given.request_id)
        return gateway_pb2.FeedbackResponse(request_id=given.request_id, model=owner.model, version=owner.version)


def _encode(tokenizer: VersionTokenizer, prompt: Prompt, max_chars: int) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt)
    return tokenizer.encode_chat(prompt, max_chars)


def _scenario_ref(text: str) -> tuple[str, int | None]:
    """'support' -> ('support', None); 'support@2' -> ('support', 2): template version 2, pinned.
    Without '@' any label goes (an unreleased scenario is a label only)."""
    if "@" not in text:
        return text, None
    try:
        return parse_model_ref(text)
    except InvalidRequest:
        message = f"scenario must be NAME or NAME@TEMPLATE_VERSION, got {shown(text)}"
        raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, message) from None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()  # a client's text may hold a lone surrogate


def _prompt_text(prompt: Prompt) -> str:
    """The prompt as one text (a canary's sticky key when the client presents no key)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps([[message.role, message.text()] for message in prompt])
