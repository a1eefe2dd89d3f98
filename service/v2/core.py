"""The Open Inference Protocol's core, shared by every transport (REST routes, the direct path, gRPC): model lookup,
metadata, and inference from parsed tensors to output tensors.

Inputs: `pixel_values`, FP32 [N, 3, H, W] already preprocessed as the model's metadata says; or `image`, BYTES
[N] of encoded images that the server decodes and preprocesses. Outputs (ask by name; default `logits` and
`probabilities`): `logits`, `probabilities` [N, C]; `attention_rollout`, `attention_cls` [N, grid_h, grid_w];
`attentions` [N, layers, heads, tokens, tokens]; `attention_relevance` [N, grid_h, grid_w], the class-specific
relevance map of the class in the parameter `target` (the output's own, else the request's: a class index or
label, or a list of one per image; default each image's top prediction). Triton's classification extension: an output with
`parameters.classification = k` returns BYTES [N, k] of "score:index:label". Errors follow the protocol:
`{"error": "message"}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Protocol

import numpy as np
from fastapi.responses import Response
from starlette.datastructures import Headers

from service.core.batching import Result
from service.core.pipeline import check_relevance, softmax
from service.core.runtime import LoadedModel
from service.core.state import ServiceState
from service.errors import BadRequest, InvalidParameter, NotFound, PayloadTooLarge
from service.obs.tracing import TRACE_KEY, RequestTrace
from service.settings import Settings
from service.v2 import codec
from service.v2 import shared_memory as shm
from vit_artifact.attention import AttentionArgumentError, Method, attention_map
from vit_artifact.metadata import INPUT_NAME, ArtifactMetadata
from vit_artifact.relevance import relevance_grid, resolve_target

IMAGE_INPUT = "image"
# Server metadata's extensions; the gRPC service (service.grpc_v2) answers with the same list.
EXTENSIONS = ["classification", "binary_tensor_data", "statistics"]  # always on; `extensions()` adds the others


def extensions(settings: Settings) -> list[str]:
    """What `GET /v2` (and gRPC's ServerMetadata) lists: exactly the extensions this server implements now;
    `model_repository` only while admin keys enable it, `system_shared_memory` only when turned on."""
    optional = {"model_repository": bool(settings.admin_keys), shm.EXTENSION: settings.system_shared_memory}
    return [*EXTENSIONS, *(name for name, on in optional.items() if on)]


DEFAULT_OUTPUTS = ["logits", "probabilities"]
ATTENTION_OUTPUTS: dict[str, Method] = {"attention_rollout": "rollout", "attention_cls": "cls"}
RELEVANCE_OUTPUT = "attention_relevance"  # from the relevance graph, for the parameter `target`
MAP_OUTPUTS = frozenset((*ATTENTION_OUTPUTS, RELEVANCE_OUTPUT))  # [N, grid_h, grid_w] each


def find_model(state: ServiceState, name: str, version: str | None) -> LoadedModel:
    model = state.model(name)
    if version is not None and version != model.meta.version:
        raise NotFound(f"model {name!r} has version {model.meta.version!r}, not {version!r}")
    return model


def model_metadata_body(model: LoadedModel) -> dict[str, Any]:
    m = model.meta
    grid = list(m.grid)
    return {
        "name": model.name,
        "versions": [m.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, *m.input_size]},
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, len(m.labels)]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(m.labels)]},
            {"name": "attention_rollout", "datatype": "FP32", "shape": [-1, *grid]},
            {"name": "attention_cls", "datatype": "FP32", "shape": [-1, *grid]},
            *([{"name": RELEVANCE_OUTPUT, "datatype": "FP32", "shape": [-1, *grid]}] if model.has_relevance else []),
            {
                "name": "attentions",
                "datatype": "FP32",
                "shape": [-1, m.num_layers, m.num_heads, m.num_tokens, m.num_tokens],
            },
        ],
    }


def _check_count(count: int, state: ServiceState) -> None:
    """Refuse more images than VITSERVE_MAX_BATCH_FILES up front (413): each image waits in the model's bounded
    queue, and a request larger than the queue would get a 503 that no retry can cure."""
    limit = state.settings.max_batch_files
    if count > limit:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {limit} (VITSERVE_MAX_BATCH_FILES)")


async def _pixels(state: ServiceState, model: LoadedModel, request: codec.InferRequest, binary: bytes) -> np.ndarray:
    """The request's single input as model-ready pixels (N, 3, H, W)."""
    if len(request.inputs) != 1:
        raise BadRequest(
            f"send exactly one input, {INPUT_NAME!r} (FP32) or {IMAGE_INPUT!r} (BYTES); "
            f"got {[t.name for t in request.inputs]}"
        )
    tensor = request.inputs[0]
    if tensor.name == IMAGE_INPUT:
        if tensor.datatype != "BYTES":
            raise BadRequest(f"input {IMAGE_INPUT!r} must be BYTES (encoded images), not {tensor.datatype}")
        _check_count(codec.element_count(tensor.shape), state)  # before decoding: a huge shape costs nothing
        images = await _decode_input(state, tensor, binary)
        assert isinstance(images, list)
        if not images:
            raise BadRequest(f"input {IMAGE_INPUT!r} holds no images")
        state.check_room(model, len(images))  # a queue that cannot take them all: 503 before any is decoded
        prepared = await asyncio.gather(*(state.prepare(data, model.meta) for data in images))
        return np.stack([p.pixels for p in prepared])
    if tensor.name != INPUT_NAME:
        raise BadRequest(f"unknown input {tensor.name!r}; this model takes {INPUT_NAME!r} or {IMAGE_INPUT!r}")
    want = [3, *model.meta.input_size]
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {INPUT_NAME!r} must be FP32, not {tensor.datatype}")
    if len(tensor.shape) != 4 or tensor.shape[1:] != want or tensor.shape[0] < 1:
        raise BadRequest(
            f"input {INPUT_NAME!r} has shape {tensor.shape}; this model takes [N, {', '.join(map(str, want))}]"
        )
    _check_count(tensor.shape[0], state)
    values = await _decode_input(state, tensor, binary)
    assert isinstance(values, np.ndarray)
    if not np.logical_and.reduce(np.isfinite(values), axis=None):  # ndarray.all() without its Python wrapper
        raise BadRequest(f"input {INPUT_NAME!r} holds NaN or infinite values")
    return values


async def _decode_input(state: ServiceState, tensor: codec.TensorIn, binary: bytes) -> np.ndarray | list[bytes]:
    """The input's values, from the body (JSON or binary) or from a shared memory region."""
    from_region = await shm.read_input(state, tensor)
    if from_region is not None:
        tensor, binary = from_region
    values, _ = codec.decode_input(tensor, binary, 0)
    return values


_KNOWN_OUTPUTS = frozenset((*DEFAULT_OUTPUTS, *MAP_OUTPUTS, "attentions"))
_DEFAULT_REQUESTS = tuple(codec.OutputRequest(name=n) for n in DEFAULT_OUTPUTS)  # frozen: shared by requests


def _outputs(request: codec.InferRequest) -> list[codec.OutputRequest]:
    outputs = request.outputs or list(_DEFAULT_REQUESTS)
    for out in outputs:
        if out.name not in _KNOWN_OUTPUTS:
            raise BadRequest(f"unknown output {out.name!r}; this model offers {sorted(_KNOWN_OUTPUTS)}")
        k = out.parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise BadRequest(f"output {out.name!r}: classification must be a positive integer, got {k!r}")
    return outputs


def _classification(values: np.ndarray, labels: list[str], k: int) -> list[bytes]:
    """Triton's classification extension: "score:index:label", top k per row."""
    rows = []
    for row in values:
        for i in np.argsort(-row, kind="stable")[: min(k, len(labels))]:
            rows.append(f"{row[i]:f}:{i}:{labels[i]}".encode())
    return rows


class InferRequest(Protocol):
    """What `infer_response` reads of a request: a Starlette request, or service.http.fast_path's direct one."""

    @property
    def headers(self) -> Headers: ...

    @property
    def state(self) -> Any: ...

    async def body(self) -> bytes: ...


async def infer_response(state: ServiceState, request: InferRequest, name: str, version: str | None) -> Response:
    """The whole of V2 `infer` (also called directly by service.http.fast_path)."""
    model = find_model(state, name, version)
    request.state.model = model  # for the per-model request counters, as `service.api.deps.served_model` does
    body = await request.body()
    header_length = request.headers.get(codec.HEADER_LENGTH)
    # JSON tensors of several MB take long enough to parse that the event loop must not do it; a binary
    # request's JSON header is small.
    json_size = min(codec.header_length_value(header_length) or len(body), len(body))
    parsed, binary = await state.run_sized(json_size, codec.parse_request, body, header_length)
    scope = getattr(request, "scope", None)  # not isinstance(request, Request): an ABC check, slow when False
    trace = scope.get(TRACE_KEY) if scope is not None else None  # tracing on: ASGI only
    tensors, size = await infer_tensors(state, model, parsed, binary, trace=trace)
    header: dict[str, Any] = {"model_name": model.name, "model_version": model.meta.version}
    if parsed.id is not None:
        header["id"] = parsed.id
    binary_all = bool(parsed.parameters.get("binary_data_output", False))
    payload, binary_start = await state.run_sized(size, codec.encode_response, header, tensors, binary_all)
    if binary_start is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream", headers={codec.HEADER_LENGTH: str(binary_start)})


async def infer_tensors(
    state: ServiceState,
    model: LoadedModel,
    parsed: codec.InferRequest,
    binary: bytes,
    *,
    packed: bool = False,
    trace: RequestTrace | None = None,
) -> tuple[list[codec.OutputTensor], int]:
    """V2 inference, whatever the transport: a parsed request (inputs in JSON or in `binary`) -> its output
    tensors, and their size on the wire estimated from above. REST (`infer_response`) and gRPC
    (service.grpc_v2) both call it. `packed`: every output travels packed (gRPC), so none is sized as JSON."""
    outputs = _outputs(parsed)
    placed = shm.output_refs(state, outputs)  # outputs to write into shared memory regions (usually none)
    pixels = await _pixels(state, model, parsed, binary)
    binary_default = bool(parsed.parameters.get("binary_data_output", False))
    size = _check_response_size(
        outputs, len(pixels), model.meta, binary_default, state.settings.max_response_bytes, packed=packed
    )
    with_attention = any(o.name in ATTENTION_OUTPUTS or o.name == "attentions" for o in outputs)
    targets = _targets(model, parsed, outputs, len(pixels))
    # all or none; a relevance row runs on the relevance graph, which has no attentions: those take a second run
    results = await state.infer_many(
        model, list(pixels), with_attention=with_attention and targets is None, targets=targets
    )
    if targets is not None and with_attention:
        attention = await state.infer_many(model, list(pixels), with_attention=True)
        results = [dataclasses.replace(r, attentions=a.attentions) for r, a in zip(results, attention, strict=True)]
    if trace is not None:  # queue, inference and encode spans (service.obs.otel)
        trace.inferred((), results)
    tensors = await state.run_sized(size, _output_tensors, outputs, results, model.meta)
    if placed:
        tensors = await shm.write_outputs(state, placed, tensors)
    return tensors, size


# Upper bounds of an element's size on the wire: FP32 in binary, and as JSON text (`-0.0012345678918063641, `).
_BINARY_BYTES, _JSON_BYTES, _CLASSIFICATION_BYTES = 4, 24, 40


def _targets(
    model: LoadedModel, parsed: codec.InferRequest, outputs: list[codec.OutputRequest], n: int
) -> list[int] | None:
    """Each image's relevance target when `attention_relevance` is asked for (-1: its top prediction), else None.
    From the output's parameter `target`, else the request's; one value for every image, or a list of n."""
    out = next((o for o in outputs if o.name == RELEVANCE_OUTPUT), None)
    if out is None:
        return None
    check_relevance(model.name, model.meta)
    value = out.parameters.get("target", parsed.parameters.get("target"))
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise InvalidParameter(f"target lists {len(values)} classes for {n} images; give one per image, or one for all")
    try:
        return [resolve_target(v, model.meta.labels) for v in values]
    except AttentionArgumentError as e:
        raise InvalidParameter(e.message, detail=e.detail) from e


def _check_response_size(
    outputs: list[codec.OutputRequest],
    n: int,
    meta: ArtifactMetadata,
    binary_default: bool,
    limit: int,
    *,
    packed: bool = False,
) -> int:
    """The response's size, estimated from above; refused (413) before any inference when it would pass
    VITSERVE_MAX_RESPONSE_BYTES."""

    def per_image(name: str) -> int:  # elements of one image's output (worked out only for outputs asked for)
        if name in MAP_OUTPUTS:
            return meta.grid[0] * meta.grid[1]
        if name == "attentions":
            return meta.num_layers * meta.num_heads * meta.num_tokens**2
        return len(meta.labels)  # logits, probabilities

    size = 0
    for out in outputs:
        if shm.names_region(out.parameters):  # written into a shared memory region, not the response
            continue
        k = out.parameters.get("classification")
        if k is not None:
            size += n * min(k, len(meta.labels)) * _CLASSIFICATION_BYTES
            continue
        binary = packed or bool(out.parameters.get("binary_data", binary_default))
        size += n * per_image(out.name) * (_BINARY_BYTES if binary else _JSON_BYTES)
    if size > limit:
        raise PayloadTooLarge(
            f"the response would be about {size / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB limit "
            "(VITSERVE_MAX_RESPONSE_BYTES); send fewer images, ask for binary outputs (binary_data_output), or for "
            "attention_rollout / attention_cls maps instead of raw attentions",
            detail={"estimated_bytes": size, "limit_bytes": limit},
        )
    return size


def _output_tensors(
    outputs: list[codec.OutputRequest], results: list[Result], meta: ArtifactMetadata
) -> list[codec.OutputTensor]:
    """The requested outputs of a batch of results, in request order (CPU work: runs off the event loop)."""
    logits = np.array([r.logits for r in results], dtype=np.float32)  # (N, C); one call, np.stack is several

    def tensor(out_name: str) -> np.ndarray:
        if out_name == "logits":
            return logits
        if out_name == "probabilities":
            return softmax(logits).astype(np.float32)
        if out_name == RELEVANCE_OUTPUT:
            return np.stack([relevance_grid(r.relevance) for r in results if r.relevance is not None])
        attentions = np.stack([r.attentions for r in results if r.attentions is not None])  # (N, L, H, T, T)
        if out_name == "attentions":
            return attentions.astype(np.float32)
        method = ATTENTION_OUTPUTS[out_name]
        maps = [
            attention_map(a, method=method, num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid)
            for a in attentions
        ]
        return np.stack(maps).astype(np.float32)

    tensors = []
    for out in outputs:
        array = tensor(out.name)
        k = out.parameters.get("classification")
        if k is None:
            tensors.append(codec.OutputTensor(out, array, list(array.shape)))
        else:
            tensors.append(
                codec.OutputTensor(out, _classification(array, meta.labels, k), [len(array), min(k, len(meta.labels))])
            )
    return tensors
