"""The ASGI adapter of the gate (`service.http.gate`): the request id and safe headers on every answer, then one
middleware that holds each HTTP request's ticket from its headers to its answer.

`GateMiddleware` applies, in this order, what the gate decides: a place in the in-flight gauge; the key check and
the declared body size (refused before a byte is read); an inference request's body read whole against the body
budget and its pace deadline, before any route sees it, so a slow upload holds only its connection and its
reserved bytes, never an inference slot; then admission. Any other body streams to its route within the body
limit. The ticket is closed in a `finally`, so every way a request ends gives back what it took.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, PayloadTooLarge, RequestTimeout, ServiceError, error_response
from service.http.gate import Gate, Ticket, cut_off_by_shutdown, is_inference, log_access, reads_body_whole
from service.http.headers import request_id_for, with_context_headers
from service.obs.logs import REQUEST_ID

log = logging.getLogger("vitserve")


async def send_error(scope: Scope, send: Send, error: ServiceError) -> None:
    """Answer with `error` from inside a middleware, before or instead of the app. Every caller runs inside
    `RequestContextMiddleware`, which adds the request id and the safe headers."""
    await error_response(error, scope["path"])(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}  # a Response never reads the request; this is only its signature


def _target(scope: Scope) -> str:
    """The request's path and query as the access line shows them (uvicorn's way: the path percent-quoted)."""
    path = urllib.parse.quote(scope["path"])
    query = scope["query_string"]
    return f"{path}?{query.decode('ascii', 'replace')}" if query else path


class RequestContextMiddleware:
    """Give each request an id (the client's `X-Request-ID` if it is sane), echo it, add security headers.

    A request still running when the shutdown grace period ends is cancelled by uvicorn; it answers 503 with
    `Retry-After` (retry elsewhere), not uvicorn's bare 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # for service.obs.logs; this request's task holds its own value

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                log_access(
                    scope.get("client"), scope["method"], _target(scope), scope["http_version"], message["status"]
                )
                message = {**message, "headers": with_context_headers(message.get("headers", []), request_id)}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            if started:
                raise
            await send_error(scope, send_with_headers, cut_off_by_shutdown(request_id))


class _ClientGone(Exception):
    """The client disconnected before its body was complete: there is no one to answer."""


class GateMiddleware:
    """One ticket per HTTP request (see the module docstring); probes and metrics are counted, never admitted."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        ticket = self.gate.open(method, path, scope["headers"], request_id=scope["state"].get("request_id"))
        status: int | None = 500  # what the client gets if the app raises before answering
        answered = False

        async def recording_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                _note_route(ticket, scope)
                ticket.answered(status if status is not None else 500)
            await send(message)

        try:
            refused = ticket.refusal()
            if refused is None and reads_body_whole(method, path):
                try:
                    body = await self._read(receive, ticket)
                except _ClientGone:
                    status = None  # nobody to answer, nothing to count
                    return
                except (PayloadTooLarge, RequestTimeout, Overloaded) as e:
                    refused = e
                else:
                    receive = _replay(body, receive)
            elif refused is None:
                receive = self._limited(receive)
            if refused is None and is_inference(method, path):
                refused = ticket.admit()
            if refused is not None:
                await send_error(scope, recording_send, refused)
                return
            try:
                await self.app(scope, receive, recording_send)
            except PayloadTooLarge as e:  # a streamed body passed the limit where no handler turned it into a response
                if answered:
                    raise
                await send_error(scope, recording_send, e)
        finally:
            _note_route(ticket, scope)
            ticket.close(status)

    async def _read(self, receive: Receive, ticket: Ticket) -> bytes:
        """The whole body, covered from the budget as it arrives and within the ticket's pace deadline."""
        chunks: list[bytes] = []
        received = 0
        limit = self.gate.max_body
        try:
            async with asyncio.timeout_at(ticket.body_due(0)) as deadline:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > limit:
                        raise self.gate.too_large()
                    await ticket.cover(received)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
                    deadline.reschedule(ticket.body_due(received))
        except TimeoutError:
            raise ticket.too_slow(received) from None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` for a streamed body: PayloadTooLarge once it passes the body limit."""
        received = 0
        limit = self.gate.max_body

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self.gate.too_large()
            return message

        return limited_receive


def _note_route(ticket: Ticket, scope: Scope) -> None:
    """What routing found, for the request's metrics: its route template and the model it served."""
    ticket.label = getattr(scope.get("route"), "path", "unmatched")
    ticket.model = scope["state"].get("model")


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands the route the body already read, then whatever the connection says (a disconnect)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
