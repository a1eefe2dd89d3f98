"""A scripted real HTTP server, for what vitserve cannot be made to do on demand (503s, 500s, counting
connections): stdlib `http.server` in a thread on a free loopback port."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: {"status": "ok", "models": {}})  # JSON, or bytes as they are
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0  # seconds between reading the request and answering it


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    client_port: int


class Scripted:
    """A stdlib HTTP server on a free loopback port that answers with `replies` in order (the last one
    repeats) and records every request it saw."""

    def __init__(self) -> None:
        self.replies: list[Reply] = [Reply()]
        self.seen: list[Seen] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                scripted.seen.append(Seen(self.command, self.path, dict(self.headers), self.client_address[1]))
                reply = scripted.replies[min(len(scripted.seen), len(scripted.replies)) - 1]
                body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                time.sleep(reply.delay)
                self.send_response(reply.status)
                self.send_header("content-type", reply.content_type)
                self.send_header("content-length", str(len(body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that gave up on a delayed reply (its timeout, under test) closed the connection.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.seen.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
