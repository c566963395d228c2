"""Webhook settings of eval, and which audit entries are notifications."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmesh.common.audit import AuditAction, AuditEntry, AuditSource
from services.eval.settings import EvalSettings
from services.eval.webhooks import notifies, signature


def test_webhooks_need_a_secret_and_an_http_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMESH_WEBHOOK_URLS", '["https://hooks.example/llmesh"]')
    with pytest.raises(ValidationError, match="LLMESH_WEBHOOK_SECRET is required"):
        EvalSettings()
    monkeypatch.setenv("LLMESH_WEBHOOK_SECRET", "s")
    assert EvalSettings().webhook_urls == ["https://hooks.example/llmesh"]
    monkeypatch.setenv("LLMESH_WEBHOOK_URLS", '["file:///etc/passwd"]')
    with pytest.raises(ValidationError, match="http:// or https://"):
        EvalSettings()


@pytest.mark.parametrize(
    ("action", "mode", "sent"),
    [
        (AuditAction.RELEASE_APPLIED, "rollback", True),
        (AuditAction.RELEASE_APPLIED, "swap", False),
        (AuditAction.RELEASE_REFUSED, "swap", True),
        (AuditAction.ROLLBACK_REQUESTED, "rollback", True),
        (AuditAction.POLICY_DECISION, "shadow", True),
        (AuditAction.KEY_CREATED, "", False),
    ],
)
def test_refusals_rollbacks_and_decisions_are_notified(action: AuditAction, mode: str, sent: bool) -> None:
    assert notifies(AuditEntry(action=action, source=AuditSource.KAFKA, details={"mode": mode})) is sent


def test_the_signature_binds_the_time_and_the_body() -> None:
    assert signature(b"k", b"{}", 100) != signature(b"k", b"{}", 101)
    assert signature(b"k", b"{}", 100) != signature(b"k", b"{ }", 100)
    assert signature(b"k", b"{}", 100).startswith("t=100,v1=")
