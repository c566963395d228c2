"""Webhook notifications: the audit entries an operator must hear about (a refused release, a
release that waits for approval, an approval that expired, a rollback, a policy decision), POSTed
as signed JSON to every configured URL.

Level-triggered, like the audit export: each URL has its own cursor over the audit trail
(`llmesh:webhook:<url digest>:sent`); one eval replica at a time holds a URL's lease and sends what
lies past the cursor, in order, then moves it. A delivery is retried with exponential backoff; one
that still fails goes to the dead-letter topic with the reason, and the cursor moves on (one broken
receiver never stops the others, nor its own later notifications). At least once: a receiver keeps
the first delivery of each `llmesh-delivery` id.

Signature (header `llmesh-signature`): `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` under
`LLMESH_WEBHOOK_SECRET`; a receiver checks it and refuses an old `t` (a replayed delivery).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as redis
from prometheus_client import Counter

from llmesh.common.audit import AuditAction, AuditEntry, AuditTrail

log = logging.getLogger("llmesh.eval.webhooks")
SENT = Counter("llmesh_eval_webhook_deliveries_total", "Webhook deliveries by outcome", ["outcome"])
LEASE_MS = 30_000
TIMEOUT_S = 5.0
BACKOFF_S = 0.5  # then 1, 2, 4 ... between attempts, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 10.0

Post = Callable[[str, bytes, dict[str, str]], Awaitable[int]]  # url, body, headers -> HTTP status


def notifies(entry: AuditEntry) -> bool:
    """What an operator must hear about: refusals, rollbacks and the policy's decisions."""
    rolled_back = entry.action is AuditAction.RELEASE_APPLIED and entry.details.get("mode") == "rollback"
    return rolled_back or entry.action in (
        AuditAction.RELEASE_REFUSED,
        AuditAction.RELEASE_PENDING,
        AuditAction.APPROVAL_EXPIRED,
        AuditAction.ROLLBACK_REQUESTED,
        AuditAction.POLICY_DECISION,
    )


def signature(secret: bytes, body: bytes, at: int) -> str:
    mac = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


async def post_json(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST with the standard library, off the event loop; the HTTP status (0: no answer)."""

    def send() -> int:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except (urllib.error.URLError, OSError):
            return 0

    return await asyncio.to_thread(send)


@dataclass
class Failed:
    url: str
    entry: AuditEntry
    reason: str


class Webhooks:
    def __init__(
        self,
        client: redis.Redis,
        urls: list[str],
        secret: bytes,
        attempts: int,
        dead_letter: Callable[[Failed], Awaitable[None]],
        replica: str,
        post: Post = post_json,
    ) -> None:
        self.redis, self.trail = client, AuditTrail(client)
        self.urls, self.secret, self.attempts = urls, secret, attempts
        self.dead_letter, self.replica, self.post = dead_letter, replica, post

    async def run_once(self) -> int:
        """One pass over every URL this replica can lease; returns the entries handled."""
        handled = 0
        for url in self.urls:
            key = f"llmesh:webhook:{hashlib.sha256(url.encode()).hexdigest()[:16]}"
            if not await self.redis.set(f"{key}:lease", self.replica, nx=True, px=LEASE_MS):
                continue  # another replica sends to this URL now
            try:
                handled += await self._send_pending(url, f"{key}:sent")
            finally:
                await self.redis.delete(f"{key}:lease")
        return handled

    async def _send_pending(self, url: str, cursor: str) -> int:
        done = int(await self.redis.get(cursor) or 0)
        entries = await self.trail.slice(done, 100)
        for entry in entries:
            if notifies(entry):
                await self._deliver(url, entry)
            done += 1
            await self.redis.set(cursor, done)  # after each: a crash resends at most one
        return len(entries)

    async def _deliver(self, url: str, entry: AuditEntry) -> None:
        body = json.dumps({"type": entry.action.value, "entry": entry.model_dump(mode="json")}, sort_keys=True).encode()
        status = 0
        for attempt in range(self.attempts):
            headers = {
                "content-type": "application/json",
                "llmesh-delivery": entry.id,
                "llmesh-signature": signature(self.secret, body, int(time.time())),
            }
            status = await self.post(url, body, headers)
            if 200 <= status < 300:
                SENT.labels("delivered").inc()
                return
            SENT.labels("retried").inc()
            if attempt + 1 < self.attempts:
                await asyncio.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))
        SENT.labels("dead-lettered").inc()
        reason = f"webhook {url} answered {status or 'nothing'} to {self.attempts} attempts"
        log.warning("webhook delivery failed", extra={"url": url, "entry": entry.id, "status": status})
        await self.dead_letter(Failed(url, entry, reason))
