"""The hot routes, V2 `infer` and `/v1/classify`, past the general machinery.

**Past FastAPI's router** (`FastPath`, ASGI): a profile of the server under load (py-spy, 64 connections of V2
requests for the default model) put about 45% of the event loop's time in FastAPI's and Starlette's routing,
dependency solving and request/response wrapping. `infer` has no query parameters and parses its body itself,
so `FastPath` matches its two paths with one regular expression and calls the handler
(`service.v2.core.infer_response`) directly, inside every vitserve middleware.

**Past ASGI altogether** (`DirectInfer`, from the connection layer): what remained was ASGI itself (a scope, a
task, a chain of eight middlewares and their send wrappers, two writes per response), about half of the event
loop's time per request. The connection (`service.http.protocol.GuardedProtocol`) asks `DirectInfer.begin` at
each request's headers; an eligible request is collected and answered here, with one write, applying the very
same rules as the middleware, imported from where they live: the request id and safe headers, API keys, the
body limit, budget and pace deadline, admission, metrics and the access log. A request is eligible when it is a
POST to an `infer` path without a query or escapes, or to a `classify` path whose only query is a valid `top_k`
(classify's handler reads its multipart form through a Starlette request over the collected body, so the form
is parsed, and its errors worded, by the same code as on the ASGI way: a profile of `/v1/classify` had put 55%
of the event loop's time in ASGI, FastAPI's routing and its dependencies), with a `Content-Length` up to
`DIRECT_MAX_BODY` bytes (and
within `VITSERVE_MAX_BODY_BYTES`), no `Expect: 100-continue`, while its body fits the body budget now and CORS
and tracing are off (their headers and spans come from middleware); every other request (chunked, large, pipelined behind another, refused, cross-origin) takes the ASGI
way, whose middleware answers it as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from types import SimpleNamespace
from typing import Any, AnyStr, TypeVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import route_table
from service.api import inference
from service.api.inference import DEFAULT_TOP_K, MAX_TOP_K
from service.core.state import ServiceState
from service.errors import ServiceError, error_response
from service.http.gate import Gate, Ticket, content_length, cut_off_by_shutdown, internal_error, log_access
from service.http.headers import with_context_headers
from service.http.protocol import GuardedProtocol, RequestHead
from service.obs.logs import REQUEST_ID
from service.v2 import core as v2

log = logging.getLogger("vitserve")
T = TypeVar("T")

# The direct path takes plain paths only: a %-escape, or any query but a plain `top_k` for classify, goes the
# ASGI way, which decodes it (and answers a bad `top_k` with FastAPI's validation).
_TOP_K = re.compile(rb"top_k=([1-9][0-9]{0,3})")
_DIRECT = tuple(
    (route, re.compile(route_table.template_pattern(route.path, "[^/?%]+").encode()))
    for route in route_table.ROUTES
    if route.direct
)
# FastPath: V2 infer over the decoded path ASGI gives; `route` is what metrics and traces read of a route.
_V2_INFER = tuple(
    (SimpleNamespace(path=route.path), re.compile(route_table.template_pattern(route.path)))
    for route in route_table.ROUTES
    if route.direct and route.path.startswith("/v2/")
)


def _first_match(patterns: tuple[tuple[T, re.Pattern[AnyStr]], ...], path: AnyStr) -> tuple[T, dict[str, Any]] | None:
    """The first route whose pattern matches `path` whole, and its parameters."""
    for route, pattern in patterns:
        if (match := pattern.fullmatch(path)) is not None:
            return route, match.groupdict()
    return None


# Bodies up to this size are collected by the connection itself; larger ones stream through the middleware.
DIRECT_MAX_BODY = 1 << 20


class FastPath:
    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = (
            _first_match(_V2_INFER, scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        if found is None:
            await self.app(scope, receive, send)
            return
        route, params = found
        name, version = params["name"], params.get("version")
        scope["route"], scope["path_params"] = route, params
        try:
            response = await v2.infer_response(self.state, Request(scope, receive), name, version)
        except ServiceError as e:
            response = error_response(e, scope["path"])
        await response(scope, receive, send)


class DirectRequest:
    """What `v2.infer_response` reads of a request: its body, headers and state."""

    __slots__ = ("_body", "headers", "state")

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._body = body
        self.headers = Headers(raw=headers)
        self.state = SimpleNamespace()

    async def body(self) -> bytes:
        return self._body


class _V2Infer:
    """V2 `infer`: `v2.infer_response` reads a `DirectRequest`."""

    path = template = ""

    def __init__(self, name: str, version: str | None) -> None:
        self.name, self.version = name, version

    def request(self, exchange: Exchange, body: bytes) -> DirectRequest:
        return DirectRequest(body, exchange.headers)

    async def respond(self, state: ServiceState, exchange: Exchange, request: Any) -> Response:
        return await v2.infer_response(state, request, self.name, self.version)


class _Classify:
    """`/v1/classify` and `/v1/models/{name}/classify`: the route's own handler, given a Starlette request over
    the collected body, so that the multipart form is read by the same code (and its errors worded the same) as
    on the ASGI way; the answer serialized as FastAPI serializes its response model."""

    path = template = ""

    def __init__(self, name: str | None, k: int) -> None:
        self.name, self.k = name, k

    def request(self, exchange: Exchange, body: bytes) -> Request:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": exchange.path,
            "query_string": exchange.query,
            "headers": exchange.headers,
            "state": {},
            "app": exchange.direct.app,
        }
        return Request(scope, receive)

    async def respond(self, state: ServiceState, exchange: Exchange, request: Any) -> Response:
        answer = await inference.classify_response(self.name, request, state, exchange.request_id, self.k)
        return Response(answer.model_dump_json().encode(), media_type="application/json")


@functools.lru_cache(maxsize=1024)  # clients send the same few targets again and again; a target is never changed
def direct_target(url: bytes) -> _V2Infer | _Classify | None:
    """What the direct path would answer at this raw request target (path and query), or None: the ASGI way."""
    path, _, query = url.partition(b"?")
    found = _first_match(_DIRECT, path)
    if found is None:
        return None
    route, raw = found
    params = {key: value.decode("ascii") for key, value in raw.items()}
    target: _V2Infer | _Classify
    if route.operation.startswith("classify"):
        k = DEFAULT_TOP_K
        if query and ((top_k := _TOP_K.fullmatch(query)) is None or (k := int(top_k[1])) > MAX_TOP_K):
            return None
        target = _Classify(params.get("name"), k)
    elif query:
        return None
    else:
        target = _V2Infer(params["name"], params.get("version"))
    target.path, target.template = path.decode("ascii"), route.path  # no escapes: as the ASGI scope would have it
    return target


class DirectInfer:
    """The direct path of one server process: which requests it takes; the gate decides everything else."""

    def __init__(self, app: ASGIApp, state: ServiceState, gate: Gate) -> None:
        self.app = app  # in each request's scope, as on the ASGI way (Starlette turns form errors into 400s then)
        self.state = state
        self.gate = gate
        self.max_body = min(DIRECT_MAX_BODY, gate.max_body)

    def begin(self, connection: GuardedProtocol, head: RequestHead) -> Exchange | None:
        """An exchange for the request whose headers just arrived on `connection`, or None: the ASGI way."""
        if head.method != b"POST" or head.expect_continue:
            return None
        target = direct_target(head.url)
        if target is None:
            return None
        size: int | None = None
        for name, value in head.headers:
            if name == b"content-length":
                size = content_length(value)
            elif name == b"transfer-encoding":
                return None
        if size is None or size > self.max_body:
            return None
        ticket = self.gate.open("POST", target.path, head.headers, declared=size)
        ticket.label = target.template
        refused = ticket.refusal()  # keys first: a refused request reserves nothing, and its body is dropped
        if refused is None and not ticket.cover_now(size):
            ticket.close(None)  # no room now: the ASGI way waits for room, then answers 503
            return None
        return Exchange(self, connection, head, target, ticket, refused)


class _NoEvent:
    def set(self) -> None:  # the connection sets its request's event when it closes; an exchange waits on none
        pass


class Exchange:
    """One request on the direct path. On the connection it stands where uvicorn's request-response cycle
    would, with the attributes the connection layer reads (response_started, response_complete, keep_alive,
    disconnected, message_event). What it holds is its ticket's, given back by `ticket.close`."""

    message_event = _NoEvent()

    def __init__(
        self,
        direct: DirectInfer,
        connection: GuardedProtocol,
        head: RequestHead,
        target: _V2Infer | _Classify,
        ticket: Ticket,
        refused: ServiceError | None,
    ) -> None:
        self.direct = direct
        self.connection = connection
        self.target = target
        self.ticket = ticket
        self.refused = refused
        self.url = head.url.decode("ascii")  # path and query, as the access log shows it
        self.path, self.query = target.path, head.url.partition(b"?")[2]
        self.headers = head.headers
        self.http_version = head.http_version
        self.client = head.client
        self.keep_alive = head.keep_alive
        self.request_id = ticket.request_id
        self.chunks: list[bytes] = []
        self.received = 0
        self.response_started = self.response_complete = self.disconnected = False
        self.loop = asyncio.get_running_loop()
        self.pace_timer: asyncio.TimerHandle | None = self.loop.call_at(ticket.body_due(0), self._check_pace)

    # --- the body -------------------------------------------------------------------------------------------
    def on_body(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.refused is None:  # a refused request's body is read past, never kept
            self.chunks.append(chunk)

    def on_complete(self) -> None:
        """The whole body is in: answer it in a task the server waits for at shutdown, as uvicorn's are."""
        self._stop_pace()
        self.connection.start_task(self._run(b"".join(self.chunks)))
        self.chunks = []

    def abandon(self) -> None:
        """The client left before its body was complete: nobody to answer, free what the request held now."""
        self.response_complete = self.disconnected = True
        self._stop_pace()
        self.ticket.close(None)

    def _stop_pace(self) -> None:
        if self.pace_timer is not None:
            self.pace_timer.cancel()
            self.pace_timer = None

    def _check_pace(self) -> None:
        """The body may take the grace period plus its size at the minimum rate (the gate's rule)."""
        due = self.ticket.body_due(self.received)
        if self.loop.time() < due:
            self.pace_timer = self.loop.call_at(due, self._check_pace)
            return
        self.pace_timer = None
        self._finish(error_response(self.ticket.too_slow(self.received), self.path))

    # --- the answer -----------------------------------------------------------------------------------------
    async def _run(self, body: bytes) -> None:
        REQUEST_ID.set(self.request_id)  # for service.obs.logs; this task holds its own value
        try:
            response = await self._respond(body)
        except asyncio.CancelledError:  # the shutdown's grace period ended first
            self._finish(error_response(cut_off_by_shutdown(self.request_id), self.path))
            raise
        except Exception:  # a fault while answering: the client still gets a 500
            response = internal_error(self.request_id, self.path)
        self._finish(response)

    async def _respond(self, body: bytes) -> Response:
        refused = self.refused or self.ticket.admit()
        if refused is not None:
            return error_response(refused, self.path)
        request = None
        try:
            request = self.target.request(self, body)
            return await self.target.respond(self.direct.state, self, request)
        except ServiceError as e:
            return error_response(e, self.path)
        except Exception:
            return internal_error(self.request_id, self.path)
        finally:
            self.ticket.model = getattr(getattr(request, "state", None), "model", None)

    def _finish(self, response: Response) -> None:
        """Write the whole response at once, close the ticket (counted, everything given back), hand the
        connection back."""
        if self.response_complete:
            return
        self.response_started = self.response_complete = True
        self._stop_pace()
        self.ticket.answered(response.status_code)  # counted before the answer leaves: a client reads it at once
        log_access(self.client, "POST", self.url, self.http_version, response.status_code)
        try:
            self._write(response)
        except Exception:  # nothing more can be said on this connection; what the request held is still freed
            log.exception("request %s: the answer could not be written; closing the connection", self.request_id)
            self.keep_alive = False
        finally:
            self.ticket.close(response.status_code)
            self.connection.exchange_done(self)

    def _write(self, response: Response) -> None:
        headers = []
        for name, value in with_context_headers(response.raw_headers, self.request_id):
            if name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                continue
            headers.append((name, value))
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        if not self.disconnected:
            self.connection.write_response(response.status_code, headers, response.body)  # type: ignore[arg-type]
