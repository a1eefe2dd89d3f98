"""The per-image work around a runtime call: decode and preprocess before, probabilities and maps after.

Everything here is synchronous and CPU-bound; routes run it in worker threads, never on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.core.budgets import ByteBudget, Reservation
from service.core.imaging import decode_image
from service.core.overlay import overlay_title, percent, render_overlay
from service.core.schemas import AttentionParams, Prediction
from service.errors import InvalidParameter, NotFound
from vit_artifact.attention import AttentionArgumentError, Method, NoSuchIndex, attention_map
from vit_artifact.metadata import ArtifactMetadata
from vit_artifact.preprocessing import crop_box, preprocess

# Overlays are drawn at most 512 px wide (service.core.overlay); a source of twice that keeps them sharp, and a
# request that asks for one holds this much of its photo, not the whole decoded image.
OVERLAY_SOURCE_SIDE = 1024


@dataclass
class Prepared:
    pixels: np.ndarray  # (3, H, W) float32 model input
    decode_ms: float
    preprocess_ms: float
    overlay_source: Image.Image | None = None  # the upright photo, reduced for display, when an overlay is due
    overlay_box: tuple[float, float, float, float] | None = None  # the region the model saw, in its pixels
    started: float = 0.0  # perf_counter when decoding began: tracing places its spans from it (service.obs.tracing)


def prepare(
    data: bytes,
    meta: ArtifactMetadata,
    *,
    max_pixels: int,
    budget: ByteBudget | None = None,
    for_overlay: bool = False,
    jpeg_draft: bool = True,
    wait_for_budget: bool = True,
) -> Prepared:
    """Decode and preprocess one image. The decoded image's memory is reserved from `budget` while it lives,
    which is only inside this call: what outlives it is the model input and, `for_overlay`, a small copy.
    `jpeg_draft` lets a large JPEG decode at reduced scale (`VITSERVE_JPEG_DRAFT`, `imaging.decode_image`).
    `wait_for_budget=False`: refuse (Overloaded) at once when the budget has no room now, never block."""
    with Reservation(budget, wait=wait_for_budget) as reservation:
        t0 = time.perf_counter()
        image = decode_image(
            data,
            max_pixels=max_pixels,
            target_size=meta.preprocessing.resize_size,
            draft=jpeg_draft,
            reservation=reservation,
        )
        t1 = time.perf_counter()
        pixels = preprocess(image, meta.preprocessing)
        t2 = time.perf_counter()
        prepared = Prepared(pixels=pixels, decode_ms=(t1 - t0) * 1e3, preprocess_ms=(t2 - t1) * 1e3, started=t0)
        if for_overlay:
            # A box reduction first (to at least twice the side): a copy of the whole image would cost as much
            # as the decoded image itself again.
            source = image.reduce(max(1, max(image.size) // (2 * OVERLAY_SOURCE_SIDE)))
            source.thumbnail((OVERLAY_SOURCE_SIDE, OVERLAY_SOURCE_SIDE))
            prepared.overlay_source = source
            prepared.overlay_box = crop_box(image.size, meta.preprocessing, original_size=source.size)
        return prepared


def softmax(logits: np.ndarray) -> np.ndarray:
    """In float64, over the last axis, in four ufunc calls (it runs on the event loop for every V2 request; the
    reductions are what `ndarray.max` and `.sum` call, without their Python wrappers)."""
    shifted = logits - np.maximum.reduce(logits, axis=-1, keepdims=True)  # stable for large logits
    e = np.exp(shifted, dtype=np.float64)
    e /= np.add.reduce(e, axis=-1, keepdims=True)
    return e


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    """Top-k predictions of one image's logits (C,)."""
    probs = softmax(logits)
    k = min(k, len(labels))
    order = (-probs).argsort(kind="stable")[:k]  # the method: np.argsort's wrapper cost more than the sort
    return [Prediction(label=labels[i], index=int(i), probability=float(probs[i])) for i in order]


def attention_grid(
    attentions: np.ndarray, meta: ArtifactMetadata, method: Method, params: AttentionParams
) -> np.ndarray:
    """One image's (L, H, N, N) attention -> (grid_h, grid_w) map in [0, 1]; bad arguments are client errors."""
    try:
        return attention_map(
            attentions,
            method=method,
            layer=params.layer,
            head=params.head,
            head_fusion=params.head_fusion,
            discard_ratio=params.discard_ratio,
            num_prefix_tokens=meta.num_prefix_tokens,
            grid=meta.grid,
        )
    except NoSuchIndex as e:
        raise NotFound(e.message, detail=e.detail) from e
    except AttentionArgumentError as e:
        raise InvalidParameter(e.message, detail=e.detail) from e


def overlay_png(prepared: Prepared, heatmap: np.ndarray, *, alpha: float, title: str) -> bytes:
    assert prepared.overlay_source is not None, "prepare(..., for_overlay=True) keeps the photo for overlays"
    return render_overlay(prepared.overlay_source, heatmap, box=prepared.overlay_box, alpha=alpha, title=title)


def describe(method: str, params: AttentionParams, top: Prediction, target: Prediction | None = None) -> str:
    """The overlay's title; a relevance map names the class it explains, and the prediction where that differs."""
    if target is not None:
        title = f"relevance for {target.label} ({percent(target.probability)})"
        return title if target.index == top.index else f"{title} · predicted {top.label} ({percent(top.probability)})"
    return overlay_title(method, layer=params.layer, head=params.head, label=top.label, probability=top.probability)


def explained(logits: np.ndarray, labels: list[str], target: int) -> Prediction:
    """The class a relevance map explains: `target`, or the top prediction for -1 (as the graph chooses it)."""
    index = int(np.argmax(logits)) if target < 0 else target
    return Prediction(label=labels[index], index=index, probability=float(softmax(logits)[index]))


def check_relevance(name: str, meta: ArtifactMetadata) -> None:
    """422 for a model that cannot make relevance maps, saying why and what to do."""
    if "relevance" in meta.graphs:
        return
    detail = {"model": name, "precision": meta.precision, "method": "relevance"}
    if meta.precision != "fp32":
        raise InvalidParameter(
            f"model {name} is {meta.precision}: relevance maps are computed by FP32 artifacts only; ask the "
            "FP32 model it was made from",
            detail=detail,
        )
    raise InvalidParameter(
        f"model {name} was exported without the relevance graph (before relevance maps existed): re-export "
        "it with `python -m model_export` (hf, timm, own), or for the project's own ViT add the graph with "
        f"`python -m model_export add-relevance models/{name}`",
        detail=detail,
    )
