"""Classification and attention maps. Each handler serves two routes (service.route_table.model_pair): a named
model's and the default model's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from service.api.deps import RequestId, State, served_model
from service.api.uploads import BATCH_BODY, IMAGE_BODY, Upload, read_image, read_images
from service.core.batching import Result
from service.core.pipeline import Prepared, attention_grid, check_relevance, describe, explained, overlay_png, top_k
from service.core.runtime import LoadedModel
from service.core.schemas import (
    AttentionBatchItem,
    AttentionBatchResponse,
    AttentionMethod,
    AttentionParams,
    AttentionResponse,
    BatchItem,
    BatchResponse,
    ClassifyResponse,
    ErrorInfo,
    ErrorResponse,
    Grid,
    HeadFusion,
    Prediction,
    Timings,
)
from service.errors import InvalidParameter, ServiceError
from service.obs.tracing import TRACE_KEY
from service.route_table import model_pair
from vit_artifact.attention import AttentionArgumentError
from vit_artifact.metadata import ArtifactMetadata
from vit_artifact.relevance import relevance_grid, resolve_target

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in [
        (400, "the image could not be decoded, or the request is malformed"),
        (404, "unknown model, layer or head"),
        (413, "body over VITSERVE_MAX_BODY_BYTES, or image over VITSERVE_MAX_PIXELS"),
        (415, "not multipart/form-data or image/*, or an image format that is not accepted"),
        (422, "a query parameter is out of range"),
        (503, "not ready, or overloaded (see Retry-After)"),
    ]
}
DEFAULT_TOP_K = 5  # the one home of this default: the SDK and CLI send no top_k unless asked
MAX_TOP_K = 1000
TopK = Annotated[int, Query(ge=1, le=MAX_TOP_K, description="how many predictions to return")]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _timings(prepared: list[Prepared], results: list[Result], started: float) -> Timings:
    """Summed over the images of a request; inference is the runtime call (shared by a coalesced batch)."""
    return Timings(
        decode_ms=round(sum(p.decode_ms for p in prepared), 3),
        preprocess_ms=round(sum(p.preprocess_ms for p in prepared), 3),
        queue_ms=round(max((r.queue_ms for r in results), default=0.0), 3),
        inference_ms=round(max((r.compute_ms for r in results), default=0.0), 3),
        batch_size=max((r.batch_size for r in results), default=0),
        total_ms=_ms(time.perf_counter() - started),
    )


async def classify_response(
    name: str | None, request: Request, state: State, request_id: str, k: int
) -> ClassifyResponse:
    """The whole of classify (also called directly by service.http.fast_path)."""
    started = time.perf_counter()
    model = served_model(request, state, name)
    data = (await read_image(request)).data
    state.check_room(model, 1)  # a request that would miss its latency budget: 503 before it is decoded
    prepared = await state.prepare(data, model.meta)
    result = await state.infer(model, prepared.pixels, with_attention=False)
    if (trace := request.scope.get(TRACE_KEY)) is not None:  # the one cost of tracing when it is off
        trace.inferred([prepared], [result])
    return ClassifyResponse(
        model=model.name,
        version=model.meta.version,
        predictions=top_k(result.logits, model.meta.labels, k),
        timings=_timings([prepared], [result], started),
        request_id=request_id,
    )


@model_pair(
    router,
    "classify",
    "classify_default",
    summaries=("Classify one image", "Classify one image with the default model"),
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
)
async def classify(
    name: str | None, request: Request, state: State, request_id: RequestId, top_k: TopK = DEFAULT_TOP_K
) -> ClassifyResponse:
    return await classify_response(name, request, state, request_id, top_k)


async def _prepare_or_error(state: State, upload: Upload, meta: ArtifactMetadata) -> Prepared | ErrorInfo:
    try:
        return await state.prepare(upload.data, meta)
    except ServiceError as e:  # a bad image is that image's error, not the batch's
        return ErrorInfo(code=e.code, message=e.message, detail=e.detail)


async def _run_batch(
    request: Request, state: State, model: LoadedModel, *, with_attention: bool, target: int | None = None
) -> tuple[list[tuple[str | None, ErrorInfo | None]], list[tuple[int, Prepared]], Sequence[Result]]:
    """A batch request's images through the model: each upload's (filename, error), the good ones (index,
    prepared) and their results. Admitted together or not at all; in the queue they coalesce with each other
    and with other requests."""
    uploads = await read_images(request, state.settings.max_batch_files)
    state.check_room(model, len(uploads))  # a queue that cannot take them all: 503 before any is decoded
    outcomes = await asyncio.gather(*(_prepare_or_error(state, u, model.meta) for u in uploads))
    good = [(i, p) for i, p in enumerate(outcomes) if isinstance(p, Prepared)]
    targets = None if target is None else [target] * len(good)
    results = await state.infer_many(model, [p.pixels for _, p in good], with_attention=with_attention, targets=targets)
    if (trace := request.scope.get(TRACE_KEY)) is not None:
        trace.inferred([p for _, p in good], results)
    entries = [(u.filename, o if isinstance(o, ErrorInfo) else None) for u, o in zip(uploads, outcomes, strict=True)]
    return entries, good, results


async def _batch(name: str | None, request: Request, state: State, request_id: str, k: int) -> BatchResponse:
    started = time.perf_counter()
    model = served_model(request, state, name)
    entries, good, results = await _run_batch(request, state, model, with_attention=False)
    items = [BatchItem(index=i, filename=f, error=e) for i, (f, e) in enumerate(entries)]
    for (i, _), result in zip(good, results, strict=True):
        items[i].predictions = top_k(result.logits, model.meta.labels, k)
    return BatchResponse(
        model=model.name,
        version=model.meta.version,
        results=items,
        timings=_timings([p for _, p in good], list(results), started),
        request_id=request_id,
    )


@model_pair(
    router,
    "classify_batch",
    "classify_batch_default",
    summaries=("Classify several images in one request", "Classify several images with the default model"),
    response_model=BatchResponse,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
)
async def classify_batch(
    name: str | None, request: Request, state: State, request_id: RequestId, top_k: TopK = DEFAULT_TOP_K
) -> BatchResponse:
    return await _batch(name, request, state, request_id, top_k)


class MapQuery:
    """How to draw the attention map (FastAPI validates types and ranges: 422 otherwise); the batch route's query."""

    def __init__(
        self,
        method: Annotated[
            AttentionMethod,
            Query(
                description="rollout: Abnar & Zuidema; cls: last layer's "
                "class-token attention; layer: one layer (and head); relevance: Chefer et al.'s class-specific "
                "relevance (gradient-weighted attention), for `target`"
            ),
        ] = "rollout",
        layer: Annotated[
            int | None, Query(description="layer index for method=layer (negative counts from the end)")
        ] = None,
        head: Annotated[int | None, Query(description="head index for method=layer; default: heads fused")] = None,
        head_fusion: Annotated[HeadFusion | None, Query(description="how heads combine (default mean)")] = None,
        discard_ratio: Annotated[
            float | None,
            Query(ge=0.0, lt=1.0, description="rollout: drop this fraction of the weakest attention (default 0)"),
        ] = None,
        target: Annotated[
            str | None,
            Query(
                description="method=relevance: the class to explain, a class index or a label; default: the top "
                "prediction"
            ),
        ] = None,
        top_k: TopK = DEFAULT_TOP_K,
    ) -> None:
        self.method = method
        self.params = AttentionParams(layer=layer, head=head, head_fusion=head_fusion, discard_ratio=discard_ratio)
        self.target = target
        self.top_k = top_k


class AttentionQuery:
    """The one-image attention routes' query: the map, and whether it comes back as JSON or a PNG overlay."""

    def __init__(
        self,
        map: Annotated[MapQuery, Depends()],
        format: Annotated[str, Query(pattern="^(json|png)$", description="json map, or a PNG overlay")] = "json",
        alpha: Annotated[float, Query(ge=0.0, le=1.0, description="PNG overlay opacity")] = 0.5,
    ) -> None:
        self.map = map
        self.format = format
        self.alpha = alpha


def _attention_model(request: Request, state: State, name: str | None, q: MapQuery) -> tuple[LoadedModel, int | None]:
    """The model, and for method=relevance the target class index (-1: the top prediction); 422 for a model
    without the graph the method needs, a target it has not got, or arguments the method does not take."""
    model = served_model(request, state, name)
    if q.method != "relevance":
        if q.target is not None:
            raise InvalidParameter(f"target applies to method 'relevance', not {q.method!r}; use method=relevance")
        if not model.has_attention:
            raise InvalidParameter(f"model {model.name} was exported without the attention graph")
        return model, None
    given = [k for k, v in q.params.model_dump().items() if v is not None]
    if given:
        raise InvalidParameter(f"{given[0]} does not apply to method 'relevance'; leave it out")
    check_relevance(model.name, model.meta)
    try:
        return model, resolve_target(q.target, model.meta.labels)
    except AttentionArgumentError as e:
        raise InvalidParameter(e.message, detail=e.detail) from e


def _heatmap(result: Result, meta: ArtifactMetadata, q: MapQuery) -> np.ndarray:
    if q.method == "relevance":
        assert result.relevance is not None, "the batcher returns relevance when a target was given"
        return relevance_grid(result.relevance)
    assert result.attentions is not None, "the batcher returns attentions when they were asked for"
    return attention_grid(result.attentions, meta, q.method, q.params)


def _explained(result: Result, meta: ArtifactMetadata, target: int | None) -> Prediction | None:
    return None if target is None else explained(result.logits, meta.labels, target)


async def _attention(
    name: str | None, request: Request, state: State, request_id: str, q: AttentionQuery
) -> Response | AttentionResponse:
    started = time.perf_counter()
    model, target = _attention_model(request, state, name, q.map)
    meta, m = model.meta, q.map
    data = (await read_image(request)).data
    state.check_room(model, 1)  # as classify: refused before it is decoded
    prepared = await state.prepare(data, meta, for_overlay=q.format == "png")
    result = await state.infer(model, prepared.pixels, with_attention=target is None, target=target)
    if (trace := request.scope.get(TRACE_KEY)) is not None:
        trace.inferred([prepared], [result])
    heatmap = await state.run_cpu(_heatmap, result, meta, m)
    predictions = top_k(result.logits, meta.labels, m.top_k)
    explains = _explained(result, meta, target)
    if q.format == "png":
        png = await state.run_cpu(
            overlay_png,
            prepared,
            heatmap,
            alpha=q.alpha,
            title=describe(m.method, m.params, predictions[0], explains),
        )
        return Response(content=png, media_type="image/png")
    return AttentionResponse(
        model=model.name,
        version=meta.version,
        method=m.method,
        params=m.params,
        grid=Grid(height=meta.grid[0], width=meta.grid[1]),
        map=heatmap.astype(np.float64).round(5).tolist(),
        target=explains,
        predictions=predictions,
        timings=_timings([prepared], [result], started),
        request_id=request_id,
    )


ATTENTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"content": {"image/png": {}}, "description": "JSON map, or PNG overlay"},
}


@model_pair(
    router,
    "attention",
    "attention_default",
    summaries=("Attention map of one image", "Attention map of one image, default model"),
    response_model=AttentionResponse,
    responses=ATTENTION_RESPONSES,
    openapi_extra=IMAGE_BODY,
)
async def attention(
    name: str | None,
    request: Request,
    state: State,
    request_id: RequestId,
    q: Annotated[AttentionQuery, Depends()],
) -> Response | AttentionResponse:
    return await _attention(name, request, state, request_id, q)


def _maps(results: Sequence[Result], meta: ArtifactMetadata, q: MapQuery) -> list[np.ndarray]:
    """Every image's map; a bad layer, head or combination fails on the first, as the request's error."""
    return [_heatmap(result, meta, q) for result in results]


async def _attention_batch(
    name: str | None, request: Request, state: State, request_id: str, q: MapQuery
) -> AttentionBatchResponse:
    started = time.perf_counter()
    model, target = _attention_model(request, state, name, q)
    meta = model.meta
    entries, good, results = await _run_batch(request, state, model, with_attention=target is None, target=target)
    maps = await state.run_cpu(_maps, results, meta, q)
    items = [AttentionBatchItem(index=i, filename=f, error=e) for i, (f, e) in enumerate(entries)]
    for (i, _), result, heatmap in zip(good, results, maps, strict=True):
        items[i].map = heatmap.astype(np.float64).round(5).tolist()
        items[i].target = _explained(result, meta, target)
        items[i].predictions = top_k(result.logits, meta.labels, q.top_k)
    return AttentionBatchResponse(
        model=model.name,
        version=meta.version,
        method=q.method,
        params=q.params,
        grid=Grid(height=meta.grid[0], width=meta.grid[1]),
        results=items,
        timings=_timings([p for _, p in good], list(results), started),
        request_id=request_id,
    )


@model_pair(
    router,
    "attention_batch",
    "attention_batch_default",
    summaries=("Attention maps of several images in one request", "Attention maps of several images, default model"),
    response_model=AttentionBatchResponse,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
)
async def attention_batch(
    name: str | None, request: Request, state: State, request_id: RequestId, q: Annotated[MapQuery, Depends()]
) -> AttentionBatchResponse:
    return await _attention_batch(name, request, state, request_id, q)
