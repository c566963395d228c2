"""The operators' API on the gateway: publish release events, roll back, approve or reject a release
that waits for approval, read the audit trail.

With API keys on, the gateway names the caller in what it publishes: the event's author is the
calling key's name (the client's signature is checked first, then the gateway signs the event again),
so that an approval policy can tell the author of a release from its approvers."""

from __future__ import annotations

import time

import grpc
from faststream.kafka import KafkaBroker

from llmesh.common import kafka
from llmesh.common.audit import AuditAction, AuditEntry, AuditSource, AuditTrail
from llmesh.common.events import InvalidEvent, ReleaseEvent, ReleaseMode
from llmesh.common.keycheck import CALLER, caller_name
from llmesh.common.registry import Registry
from llmesh.common.validation import bounded, shown
from llmesh.v1 import events_pb2, gateway_pb2, gateway_pb2_grpc


class AdminService(gateway_pb2_grpc.AdminServicer):
    def __init__(self, registry: Registry, broker: KafkaBroker, release_key: bytes | None, signers: dict[str, bytes]) -> None:
        self.registry = registry
        self.broker = broker
        self.release_key = release_key  # the gateway signs the events it makes or names the author of
        self.signers = signers
        self.audit = AuditTrail(registry.redis)

    async def PublishRelease(
        self, request: events_pb2.ReleaseEvent, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishReleaseResponse:
        try:
            event = ReleaseEvent.from_proto(request)
        except ValueError as err:  # pydantic's ValidationError is a ValueError
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(f"invalid release event: {err}"))
            raise
        if CALLER.get() is not None:  # the caller's key names the author: check the signer's work, then sign it so
            try:
                event.check_signature(self.release_key, self.signers)
            except InvalidEvent as err:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            event = event.model_copy(update={"author": caller_name(""), "signer": ""}).signed(self.release_key)
        return await self._publish(event, AuditAction.RELEASE_REQUESTED)

    async def Approve(
        self, request: gateway_pb2.ApprovalRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishReleaseResponse:
        return await self._decide(request, context, ReleaseMode.APPROVE)

    async def Reject(
        self, request: gateway_pb2.ApprovalRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishReleaseResponse:
        return await self._decide(request, context, ReleaseMode.REJECT)

    async def _decide(
        self, request: gateway_pb2.ApprovalRequest, context: grpc.aio.ServicerContext, mode: ReleaseMode
    ) -> gateway_pb2.PublishReleaseResponse:
        """Publish the caller's approve or reject event, after the checks infer will make (so that
        the caller hears at once why it would be refused)."""
        pending = (await self.registry.desired(request.model)).pending
        if pending is None or pending.version != request.version:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no release of {shown(request.model)} version {request.version} waits for approval",
            )
        assert pending is not None
        approver = caller_name(request.author)
        if mode is ReleaseMode.APPROVE and (refusal := pending.refusal(approver, time.time())):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        try:
            event = ReleaseEvent(model=request.model, version=request.version, mode=mode, author=approver, reason=request.reason)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(err)))
            raise
        action = AuditAction.APPROVAL_REQUESTED if mode is ReleaseMode.APPROVE else AuditAction.REJECTION_REQUESTED
        return await self._publish(event.signed(self.release_key), action)

    async def Rollback(
        self, request: gateway_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishReleaseResponse:
        if request.model not in await self.registry.models():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {shown(request.model)} is not registered")
        routing = await self.registry.routing(request.model)
        target = request.version or routing.previous
        if not target:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.model} has no previous version to roll back to")
        record = await self.registry.version(request.model, target)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.model} has no version {target}")
        assert record is not None
        try:
            event = ReleaseEvent(
                model=request.model,
                version=target,
                mode=ReleaseMode.ROLLBACK,
                artifact_uri=record.artifact_uri,
                sha256=record.sha256,
                author=request.author,
                reason=request.reason or f"rollback from version {routing.primary}",
            )
        except (ValueError, InvalidEvent) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(err)))
            raise
        return await self._publish(event.signed(self.release_key), AuditAction.ROLLBACK_REQUESTED)

    async def GetAudit(
        self, request: gateway_pb2.GetAuditRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetAuditResponse:
        entries = await self.audit.entries(request.model, request.since)
        problems = await self.audit.verify()
        return gateway_pb2.GetAuditResponse(entries=[e.to_proto() for e in entries], problems=problems)

    async def _publish(self, event: ReleaseEvent, action: AuditAction) -> gateway_pb2.PublishReleaseResponse:
        await kafka.publish_release(self.broker, event)
        caller = CALLER.get()  # None when keys are not required
        await self.audit.append(
            AuditEntry(
                id=f"{action}:{event.event_id}",
                action=action,
                source=AuditSource.ADMIN_API,
                actor=caller.name if caller else event.author,
                actor_key_id=caller.id if caller else "",
                model=event.model,
                version=event.version,
                reason=event.reason,
                event_id=event.event_id,
                details={"mode": event.mode.value, "author": event.author},
            )
        )
        return gateway_pb2.PublishReleaseResponse(event_id=event.event_id, model=event.model, version=event.version)
