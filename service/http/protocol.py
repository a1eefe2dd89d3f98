"""The HTTP connection layer: uvicorn's httptools protocol with the deadlines and limits a public server needs.

uvicorn closes idle keep-alive connections, but a connection that never finishes its request headers, or
opens and sends nothing, is kept forever, and there is no cap on connections short of the file-descriptor
limit (past which even `/healthz` is unreachable). `GuardedProtocol` adds, per connection:

- a **header deadline**: a request's headers must be complete `header_timeout_s` after its first byte (or,
  on a new connection, after it opened); otherwise 408 (or a silent close when nothing was sent);
- a **connection cap**: past `max_connections`, the oldest connection that is idle or still sending headers
  is closed to make room (as nginx reuses idle connections), so probes and honest clients get in while
  slow ones are shed; only when every connection is mid-request is the new one answered 503 and closed;
- a **clean drain**: once draining (`ConnectionPolicy.draining`), every response carries
  `Connection: close`; at shutdown an idle connection is closed only after `IDLE_CLOSE_GRACE_S`, and a request
  that arrives in that window is still answered, so no connection is closed with a request unanswered.

Body deadlines are the gate's (`service.http.gate.Ticket.body_due`), applied where the body is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.obs.metrics import METRICS

log = logging.getLogger("vitserve.http")

# What this module relies on of uvicorn beyond asyncio's Protocol interface: the one module that names uvicorn's
# internals (`pyproject.toml` bounds uvicorn and httptools to the versions tested with them).
# tests/service/test_uvicorn_contract.py checks every name here against the installed uvicorn.
UVICORN_ATTRIBUTES = (
    "client",
    "connections",
    "cycle",
    "expect_100_continue",
    "headers",
    "loop",
    "parser",
    "pipeline",
    "server_state",
    "tasks",
    "transport",
    "url",
)
UVICORN_METHODS = (
    "connection_lost",
    "connection_made",
    "data_received",
    "on_body",
    "on_headers_complete",
    "on_message_begin",
    "on_message_complete",
    "on_response_complete",
    "send_400_response",
    "shutdown",
)
# What uvicorn's protocol reads of its request-response cycle, which a direct-path exchange stands in for.
CYCLE_ATTRIBUTES = ("disconnected", "keep_alive", "message_event", "response_complete", "response_started")

# How long an idle keep-alive connection stays open once shutdown begins: a client that has just read its
# response and sent the next request on the same connection gets that request answered, not a reset.
IDLE_CLOSE_GRACE_S = 0.5


class RequestHead(NamedTuple):
    """A request whose headers are complete, as the direct path reads it (a tuple: one is made per request)."""

    method: bytes
    url: bytes  # path and query, raw
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    http_version: str
    keep_alive: bool  # the connection may take another request after this one's answer
    expect_continue: bool
    client: tuple[str, int] | None  # the peer's address, for the access line


class Exchange(Protocol):
    """A request the direct path took (service.http.fast_path.Exchange): on the connection it stands where uvicorn's
    request-response cycle would, with what uvicorn reads of one (CYCLE_ATTRIBUTES)."""

    response_started: bool
    response_complete: bool
    keep_alive: bool
    disconnected: bool

    def on_body(self, chunk: bytes) -> None: ...

    def on_complete(self) -> None: ...

    def abandon(self) -> None: ...


class DirectPath(Protocol):
    """What answers some requests without ASGI (service.http.fast_path.DirectInfer)."""

    def begin(self, connection: GuardedProtocol, head: RequestHead) -> Exchange | None: ...


@dataclass
class ConnectionPolicy:
    """What every connection of one server obeys; `draining` is flipped by the server on SIGTERM. `direct`
    answers V2 `infer` without ASGI (service.http.fast_path.DirectInfer); None sends every request through the app."""

    header_timeout_s: float
    max_connections: int
    draining: bool = False
    direct: DirectPath | None = None
    # The open connections, oldest first (a dict keeps insertion order): eviction looks from the oldest and
    # stops at the first it may close, where scanning uvicorn's set for the oldest cost O(connections) per
    # accept, at the cap (a connection storm made each accept a millisecond).
    by_age: dict[GuardedProtocol, None] = field(default_factory=dict)


def _raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole error response for the moments no ASGI app is involved (the body as `service.errors` renders it)."""
    body = json.dumps({"error": {"code": code, "message": message, "detail": None}}).encode()
    retry = "retry-after: 1\r\n" if status == 503 else ""  # only an overload is worth the same request again
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{retry}connection: close\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY = _raw_error(
    503, "Service Unavailable", "overloaded", "the server has too many open connections; retry shortly"
)
_UNPARSABLE = _raw_error(400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1")
_HEADERS_TOO_SLOW = _raw_error(
    408, "Request Timeout", "request_timeout", "the request headers did not arrive in time (VITSERVE_HEADER_TIMEOUT_S)"
)


class GuardedProtocol(HttpToolsProtocol):
    """One client connection; see the module docstring. `policy` is set per server by `protocol_for`."""

    policy: ClassVar[ConnectionPolicy]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.request_started = False  # a byte of the current request arrived; its headers are not complete
        self.refused = False
        self.close_when_idle = False  # shutting down: close once no request is in progress (after a grace)
        self.receiving: Exchange | None = None  # a direct-path request whose body is arriving
        # The direct-path request in progress (receiving or being answered): a request pipelined behind it
        # replaces `cycle`, and the connection's end must still reach this one.
        self.exchange: Exchange | None = None

    # --- connection lifecycle -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.policy.max_connections and not self._evict_one():
            self.refused = True
            METRICS.connections_refused.labels(reason="limit").inc()
            transport.write(_TOO_MANY)
            transport.close()
            return
        super().connection_made(transport)
        self.policy.by_age[self] = None
        METRICS.connections.inc()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.policy.by_age.pop(self, None)
        self._cancel_header_timer()
        if self.receiving is not None and not self.receiving.response_complete:
            self.receiving.abandon()
        elif self.exchange is not None:
            self.exchange.disconnected = True  # being answered: the answer is made, counted, and not written
        METRICS.connections.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """Bytes the parser refuses: answered as every other error is (JSON), and the connection closed."""
        self.transport.write(_UNPARSABLE)
        self.transport.close()

    def _evict_one(self) -> bool:
        """Close the oldest connection that is idle or still sending its headers; False when there is none."""
        victim = next((c for c in self.policy.by_age if c._idle_or_in_headers()), None)
        if victim is None:
            return False
        METRICS.connections_refused.labels(reason="evicted").inc()
        victim.transport.close()
        del self.policy.by_age[victim]
        victim.connections.discard(victim)  # its connection_lost comes later; the slot is free now
        return True

    def _idle_or_in_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # --- header deadline ------------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.policy.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        METRICS.connections_refused.labels(reason="header_timeout").inc()
        if self.request_started:  # a partial request deserves an answer; a silent connection does not
            self.transport.write(_HEADERS_TOO_SLOW)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.request_started = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self.request_started = False
        direct = self.policy.direct
        if direct is not None and (self.cycle is None or self.cycle.response_complete):  # not pipelined
            exchange = direct.begin(self, self._head())
            if exchange is not None:
                self.cycle = self.receiving = self.exchange = exchange  # type: ignore[assignment]  # as uvicorn's cycle
                return
        super().on_headers_complete()
        if self.policy.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with `Connection: close`: the client reconnects elsewhere

    def on_body(self, body: bytes) -> None:
        if self.receiving is None:
            super().on_body(body)
        elif not self.receiving.response_complete:  # else answered already (408): the rest is dropped
            self.receiving.on_body(body)

    def on_message_complete(self) -> None:
        exchange, self.receiving = self.receiving, None
        if exchange is None:
            super().on_message_complete()
        elif not exchange.response_complete:
            exchange.on_complete()

    # --- what the direct path uses of a connection (service.http.fast_path names nothing of uvicorn's) ------------
    def _head(self) -> RequestHead:
        version = self.parser.get_http_version()
        return RequestHead(
            self.parser.get_method(),
            self.url,
            self.headers,
            version,
            # As uvicorn decides for its own cycles: HTTP/1.0 closes after the answer, whatever it asked for.
            version != "1.0" and self.parser.should_keep_alive() and not self.policy.draining,
            self.expect_100_continue,
            self.client,
        )

    def start_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run an answer in a task the server waits for at shutdown, as uvicorn's own are."""
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def write_response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """One whole response in one write, with the server's default headers (date, server); nothing once the
        transport is closing (the client went while the answer was made)."""
        parts = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        if not self.transport.is_closing():
            self.transport.write(b"".join(parts))

    def exchange_done(self, exchange: Exchange) -> None:
        """A direct-path response is written: close, or take the next request as after any response."""
        self.exchange = None
        if not exchange.keep_alive:
            self.receiving = None
            self.transport.close()
        elif not self.transport.is_closing():
            self.on_response_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this connection gets a header deadline too (uvicorn's keep-alive timer covers the
        # idle time before its first byte; this covers a request that starts and then trickles).
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_header_timer()
            if self.close_when_idle:
                self.loop.call_later(IDLE_CLOSE_GRACE_S, self._close_if_idle)

    # --- drain and shutdown ---------------------------------------------------------------------------------
    def drain(self) -> None:
        """Draining has begun: a response still to be sent carries `Connection: close`."""
        self._last_response_says_close()

    def _last_response_says_close(self) -> bool:
        """Make the response in progress the last on this connection, if it can still say so (its headers are not
        sent yet); closing after a response that did not say `Connection: close` would reset the client's next
        request, already on its way."""
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.response_started:
            self.cycle.keep_alive = False
            return True
        return False

    def shutdown(self) -> None:
        if not self._last_response_says_close():
            # Idle, or a response already under way: close once idle after a short grace; a request that arrives
            # meanwhile is answered (with Connection: close, since draining is on by now), and the connection
            # closes after it.
            self.close_when_idle = True
            self.loop.call_later(IDLE_CLOSE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def protocol_for(policy: ConnectionPolicy) -> type[GuardedProtocol]:
    """A protocol class bound to one server's policy (uvicorn takes a class, and builds one per connection)."""
    return type("VitserveProtocol", (GuardedProtocol,), {"policy": policy})


def start_draining(policy: ConnectionPolicy, connections: set[Any]) -> None:
    policy.draining = True
    for connection in connections:
        if isinstance(connection, GuardedProtocol):
            connection.drain()


class AcceptErrorFilter:
    """The event loop's exception handler, with accept errors (out of file descriptors) logged once a minute:
    asyncio reports each failed accept with a traceback, which grew the log by 77 MB in 20 s under a flood."""

    INTERVAL_S = 60.0

    def __init__(self) -> None:
        self.last = -self.INTERVAL_S
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.INTERVAL_S:
            self.suppressed += 1
            return
        log.error(
            "%s: %s (%d more like it since the last report)",
            context["message"],
            context.get("exception"),
            self.suppressed,
        )
        self.last, self.suppressed = now, 0
