"""`GRPCInferenceService` beside the HTTP app: the same event loop, state, batcher, limits, keys and metrics.

grpc.aio runs on the app's own event loop (uvloop or asyncio: grpcio's completion queue is polled from a thread
of its own and hands results to whichever loop runs the server), so an RPC calls the REST routes' inference
core (`service.routes.v2.infer_tensors`) directly and its images meet HTTP requests' in the same batches.

What is shared with HTTP, and how:
- API keys: metadata `authorization: Bearer <key>` or `x-api-key: <key>`, checked by the same `Access`; an RPC
  is open without a key when its REST twin's path is in `VITSERVE_OPEN_ROUTES` (ServerLive and ServerReady are
  `/v2/health/*`, open by default).
- Limits: a message may be as large as an HTTP body (`VITSERVE_MAX_BODY_BYTES`; grpcio refuses a larger one
  with RESOURCE_EXHAUSTED before it is read whole); it is reserved from the same body budget while the RPC runs;
  element counts, pixels and response size are checked by the shared core; at most
  `VITSERVE_MAX_CONCURRENT_REQUESTS` ModelInfer calls run at once (counted apart from HTTP's, at the same limit).
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
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service import __version__
from service.errors import BadRequest, Overloaded, ServiceError, escape
from service.grpc_v2 import codec
from service.grpc_v2.stubs import Stubs, load
from service.metrics import METRICS
from service.routes import v2
from service.security import Access
from service.state import ServiceState

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

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _model_path(name: str, version: str, tail: str = "") -> str:
    """The REST path of a model's RPC (for `VITSERVE_OPEN_ROUTES`)."""
    return f"/v2/models/{name}{f'/versions/{version}' if version else ''}{tail}"


def rpc(rest_path: Callable[[Any], str]) -> Callable[[Handler], Handler]:
    """An RPC with the key check, the error mapping and the metrics every method shares; `rest_path` names its
    REST twin, whose openness it shares."""

    def wrap(method: Handler) -> Handler:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self.authorize(context, rest_path(request))
                return await method(self, request, context)
            except ServiceError as e:
                code, message = STATUS_CODES.get(e.status, grpc.StatusCode.INTERNAL), escape(e.message)
                retry = e.headers.get("Retry-After")
            except asyncio.CancelledError:  # the client went away, or the shutdown's grace ran out
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                # The traceback goes to the log only; the status names the call, never a file or exception text.
                request_id = uuid.uuid4().hex[:16]
                log.exception("gRPC %s %s failed", name, request_id)
                code, message, retry = (
                    grpc.StatusCode.INTERNAL,
                    f"internal error; quote {request_id} when reporting it",
                    None,
                )
            finally:
                METRICS.grpc_requests.labels(name, code.name).inc()
                METRICS.grpc_latency.labels(name).observe(time.perf_counter() - started)
            await context.abort(code, message, trailing_metadata=(("retry-after", retry),) if retry else ())

        return handler

    return wrap


class InferenceService:
    """The protocol's RPCs, under the generated servicer's method names."""

    def __init__(self, state: ServiceState, stubs: Stubs) -> None:
        self.state = state
        self.pb2 = stubs.pb2
        settings = state.settings
        self.access = Access(settings.api_keys, settings.admin_keys, settings.open_routes)

    def authorize(self, context: grpc.aio.ServicerContext, path: str) -> None:
        if self.access.api is None:
            return
        # gRPC metadata keys are lower case already; binary (`-bin`) values are bytes and never a key.
        headers = [
            (k.encode(), v.encode("latin-1")) for k, v in context.invocation_metadata() or () if isinstance(v, str)
        ]
        refused = self.access.check(path, headers)
        if refused is not None:
            raise refused

    @rpc(lambda _: "/v2/health/live")
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb2.ServerLiveResponse(live=True)

    @rpc(lambda _: "/v2/health/ready")
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb2.ServerReadyResponse(ready=await self.state.readiness() is None)

    @rpc(lambda request: _model_path(request.name, request.version, "/ready"))
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        model = v2.find_model(self.state, request.name, request.version or None)
        return self.pb2.ModelReadyResponse(ready=model.warmed_up)

    @rpc(lambda _: "/v2")
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb2.ServerMetadataResponse(
            name="vitserve", version=__version__, extensions=v2.extensions(self.state.settings)
        )

    @rpc(lambda request: _model_path(request.name, request.version))
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        body = v2.model_metadata_body(v2.find_model(self.state, request.name, request.version or None))
        tensor = self.pb2.ModelMetadataResponse.TensorMetadata
        return self.pb2.ModelMetadataResponse(
            name=body["name"],
            versions=body["versions"],
            platform=body["platform"],
            inputs=[tensor(**t) for t in body["inputs"]],
            outputs=[tensor(**t) for t in body["outputs"]],
        )

    @rpc(lambda request: _model_path(request.model_name, request.model_version, "/infer"))
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.model_name:  # an empty message says nothing to run: a client mistake, not an overload
            raise BadRequest("ModelInferRequest.model_name is empty; name the model to run")
        # One limit for HTTP and gRPC together; judged against the latency of its REST twin's path.
        refused = self.state.admission.enter(_model_path(request.model_name, request.model_version, "/infer"))
        if refused is not None:
            raise refused
        budget, held = self.state.body_budget, 0
        model = None
        started = time.perf_counter()
        try:
            if budget is not None:
                reserved = await budget.reserve_async(request.ByteSize())
                if reserved is None:  # None is a refusal; 0 bytes (an empty message) is not
                    raise Overloaded(
                        "the server holds too many request bodies in flight (VITSERVE_BODY_BUDGET_BYTES); retry "
                        "shortly",
                        headers={"Retry-After": "1"},
                    )
                held = reserved
            model = v2.find_model(self.state, request.model_name, request.model_version or None)
            parsed, binary = await self.state.run_sized(codec.input_size(request), codec.parse_request, request)
            tensors, size = await v2.infer_tensors(self.state, model, parsed, binary, packed=True)
            raw = bool(request.raw_input_contents)  # answer in the form asked in
            response = await self.state.run_sized(
                size, codec.build_response, self.pb2, model.name, model.meta.version, parsed.id, tensors, raw
            )
        except BaseException:
            if model is not None:  # the same series as HTTP's, which the statistics extension reads
                METRICS.observe_request(model.name, model.meta.version, False, time.perf_counter() - started)
            raise
        finally:
            self.state.admission.leave()
            if held and budget is not None:
                budget.release(held)
        METRICS.observe_request(model.name, model.meta.version, True, time.perf_counter() - started)
        return response


async def start(state: ServiceState, *, shared_port: bool) -> grpc.aio.Server:
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
    stubs.pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, stubs), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio's way of saying the port is taken or the address is wrong
        raise OSError(f"cannot serve gRPC on {address}: {e} (VITSERVE_GRPC_PORT)") from None
    await server.start()
    log.info("serving the Open Inference Protocol over gRPC on %s", address)
    return server
