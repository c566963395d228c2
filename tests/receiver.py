"""A webhook receiver for tests: a real HTTP server on a free port that answers each POST with
the next scripted status (then 200) and keeps every request it got."""

from __future__ import annotations

import hashlib
import hmac
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver(ThreadingHTTPServer):
    """Answers each POST with the next scripted status (then 200) and keeps what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.got = list(statuses), []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.server.got.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def serve(statuses: list[int]) -> Receiver:
    receiver = Receiver(statuses)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    return receiver


def verified(secret: bytes, headers: dict[str, str], body: bytes) -> bool:
    """Whether `llmesh-signature` is the HMAC of this body under `secret`."""
    fields = dict(part.split("=", 1) for part in headers["llmesh-signature"].split(","))
    expected = hmac.new(secret, f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(fields["v1"], expected)
