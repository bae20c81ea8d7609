"""An alert receiver on loopback: what the service POSTs to ``SELFIE_LORA_ALERT_URL``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


@dataclass
class AlertInbox:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    # The bodies as sent, byte for byte: what a signature is checked against.
    bodies: list[bytes] = field(default_factory=list)


@contextmanager
def alert_inbox(*, status: int = 204) -> Iterator[AlertInbox]:
    """A receiver that answers every POST (any path) with ``status``."""
    inbox = AlertInbox(url="")

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            body = self.rfile.read(length)
            inbox.bodies.append(body)
            inbox.received.append(json.loads(body))
            inbox.headers.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    inbox.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield inbox
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
