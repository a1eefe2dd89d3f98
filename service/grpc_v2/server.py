"""`GRPCInferenceService` beside the HTTP app: the same event loop, state, batcher, limits, keys and metrics.

grpc.aio runs on the app's own event loop (uvloop or asyncio: grpcio's completion queue is polled from a thread
of its own and hands results to whichever loop runs the server), so an RPC calls the REST routes' inference
core (`service.v2.core.infer_tensors`) directly and its images meet HTTP requests' in the same batches.

What is shared with HTTP, and how: every RPC passes the same gate (service.http.gate) as an HTTP request, as a
ticket opened from its metadata and closed however it ends.
- API keys: metadata `authorization: Bearer <key>` or `x-api-key: <key>`, checked by the same `Access`; an RPC
  is open without a key when its REST twin's path is in `VITSERVE_OPEN_ROUTES` (ServerLive and ServerReady are
  `/v2/health/*`, open by default).
- Limits: a message may be as large as an HTTP body (`VITSERVE_MAX_BODY_BYTES`; grpcio refuses a larger one
  with RESOURCE_EXHAUSTED before it is read whole); it is held from the same body budget while the RPC runs;
  element counts, pixels and response size are checked by the shared core; ModelInfer calls take slots of the
  same admission limit as HTTP's inference requests.
- Errors: each `ServiceError` becomes the gRPC status of its HTTP status (`STATUS_CODES`), with the same message.
- Metrics: `nv_inference_*` count gRPC inferences with HTTP's; `vitserve_grpc_*` count calls by method and code
  (`vitserve_http_*` stay HTTP only).
- Readiness: ServerReady is `/v2/health/ready`'s answer, so it turns false at once on SIGTERM; the app's
  shutdown then stops the server with `VITSERVE_SHUTDOWN_GRACE_S` of grace (in-flight calls finish).

In multi-process mode every HTTP worker serves gRPC on the same port with SO_REUSEPORT (the kernel spreads
connections over them, as the shared HTTP socket does); in one process the port is bound exclusively, so a
port already taken is an error at start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service import __version__
from service.core.state import ServiceState
from service.errors import BadRequest, ServiceError, escape
from service.grpc_v2.stubs import Stubs, load
from service.http.gate import Gate, Ticket
from service.route_table import rest_path
from service.v2 import core as v2
from service.v2 import grpc_codec as codec

log = logging.getLogger("vitserve.grpc")

# An error's HTTP status -> its gRPC status code.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}

Handler = Callable[[Any, Any, grpc.aio.ServicerContext, Ticket], Awaitable[Any]]
Servicer = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _model_path(name: str, version: str, operation: str, version_operation: str) -> str:
    """The path of a model's RPC's REST twin, whose openness it shares: the version's route when one is named."""
    if version:
        return rest_path(version_operation, name=name, version=version)
    return rest_path(operation, name=name)


def rpc(twin: Callable[[Any], str]) -> Callable[[Handler], Servicer]:
    """An RPC through the gate (service.http.gate): a ticket opened from its metadata (the key check, metrics) and
    closed however it ends; each `ServiceError` becomes the gRPC status of its HTTP status. `twin` names its
    REST twin, whose openness it shares."""

    def wrap(method: Handler) -> Servicer:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> Any:
            # gRPC metadata keys are lower case already; binary (`-bin`) values are bytes and never a key.
            metadata = [
                (k.encode(), v.encode("latin-1")) for k, v in context.invocation_metadata() or () if isinstance(v, str)
            ]
            ticket = self.gate.open_call(name, twin(request), metadata)
            code = grpc.StatusCode.OK
            try:
                refused = ticket.refusal()
                if refused is not None:
                    raise refused
                return await method(self, request, context, ticket)
            except ServiceError as e:
                code, message = STATUS_CODES.get(e.status, grpc.StatusCode.INTERNAL), escape(e.message)
                retry = None if e.retry_after is None else str(e.retry_after)
            except asyncio.CancelledError:  # the client went away, or the shutdown's grace ran out
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                # The traceback goes to the log only; the status names the call, never a file or exception text.
                log.exception("gRPC %s %s failed", name, ticket.request_id)
                code, message, retry = (
                    grpc.StatusCode.INTERNAL,
                    f"internal error; quote {ticket.request_id} when reporting it",
                    None,
                )
            finally:
                ticket.close(code.name)
            await context.abort(code, message, trailing_metadata=(("retry-after", retry),) if retry else ())

        return handler  # grpcio calls it as (self, request, context)

    return wrap


class InferenceService:
    """The protocol's RPCs, under the generated servicer's method names."""

    def __init__(self, state: ServiceState, gate: Gate, stubs: Stubs) -> None:
        self.state = state
        self.gate = gate
        self.pb2 = stubs.pb2

    @rpc(lambda _: rest_path("v2_live"))
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext, ticket: Ticket) -> Any:
        return self.pb2.ServerLiveResponse(live=True)

    @rpc(lambda _: rest_path("v2_ready"))
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext, ticket: Ticket) -> Any:
        return self.pb2.ServerReadyResponse(ready=await self.state.readiness() is None)

    @rpc(lambda r: _model_path(r.name, r.version, "v2_model_ready", "v2_model_version_ready"))
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext, ticket: Ticket) -> Any:
        model = v2.find_model(self.state, request.name, request.version or None)
        return self.pb2.ModelReadyResponse(ready=model.warmed_up)

    @rpc(lambda _: rest_path("v2_server_metadata"))
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext, ticket: Ticket) -> Any:
        return self.pb2.ServerMetadataResponse(
            name="vitserve", version=__version__, extensions=v2.extensions(self.state.settings)
        )

    @rpc(lambda r: _model_path(r.name, r.version, "v2_model_metadata", "v2_model_version_metadata"))
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext, ticket: Ticket) -> Any:
        body = v2.model_metadata_body(v2.find_model(self.state, request.name, request.version or None))
        tensor = self.pb2.ModelMetadataResponse.TensorMetadata
        return self.pb2.ModelMetadataResponse(
            name=body["name"],
            versions=body["versions"],
            platform=body["platform"],
            inputs=[tensor(**t) for t in body["inputs"]],
            outputs=[tensor(**t) for t in body["outputs"]],
        )

    @rpc(lambda r: _model_path(r.model_name, r.model_version, "v2_infer", "v2_infer_version"))
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext, ticket: Ticket) -> Any:
        if not request.model_name:  # an empty message says nothing to run: a client mistake, not an overload
            raise BadRequest("ModelInferRequest.model_name is empty; name the model to run")
        # The whole message is in: its bytes held from the body budget, then a slot of the one limit HTTP and
        # gRPC share (judged against the latency of its REST twin's path).
        await ticket.cover(request.ByteSize())
        refused = ticket.admit()
        if refused is not None:
            raise refused
        model = ticket.model = v2.find_model(self.state, request.model_name, request.model_version or None)
        parsed, binary = await self.state.run_sized(codec.input_size(request), codec.parse_request, request)
        tensors, size = await v2.infer_tensors(self.state, model, parsed, binary, packed=True)
        raw = bool(request.raw_input_contents)  # answer in the form asked in
        return await self.state.run_sized(
            size, codec.build_response, self.pb2, model.name, model.meta.version, parsed.id, tensors, raw
        )


async def start(state: ServiceState, gate: Gate, *, shared_port: bool) -> grpc.aio.Server:
    """Serve gRPC on `VITSERVE_HOST`:`VITSERVE_GRPC_PORT` until the returned server is stopped. `shared_port`:
    every HTTP worker of multi-process mode binds the same port (SO_REUSEPORT)."""
    settings = state.settings
    # Generating the stubs (first start of an environment only) takes about a second: off the loop.
    stubs = await asyncio.get_running_loop().run_in_executor(None, load, settings.grpc_stubs_dir)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),  # the shared core refuses an oversized response before inference
            ("grpc.so_reuseport", int(shared_port)),
        ]
    )
    stubs.pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, gate, stubs), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio's way of saying the port is taken or the address is wrong
        raise OSError(f"cannot serve gRPC on {address}: {e} (VITSERVE_GRPC_PORT)") from None
    await server.start()
    log.info("serving the Open Inference Protocol over gRPC on %s", address)
    return server
