"""The per-image work around a runtime call: decode and preprocess before, probabilities and maps after.

Everything here is synchronous and CPU-bound; routes run it in worker threads, never on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.errors import InvalidParameter, NotFound
from service.imaging import decode_image
from service.overlay import render_overlay
from service.schemas import AttentionParams, Prediction
from vit_artifact.attention import AttentionArgumentError, Method, NoSuchIndex, attention_map
from vit_artifact.metadata import ArtifactMetadata
from vit_artifact.preprocessing import crop_box, preprocess


@dataclass
class Prepared:
    image: Image.Image  # decoded RGB, upright; what overlays are drawn on
    pixels: np.ndarray  # (3, H, W) float32 model input
    decode_ms: float
    preprocess_ms: float


def prepare(data: bytes, meta: ArtifactMetadata, *, max_pixels: int) -> Prepared:
    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels, target_size=meta.preprocessing.resize_size)
    t1 = time.perf_counter()
    pixels = preprocess(image, meta.preprocessing)
    t2 = time.perf_counter()
    return Prepared(image=image, pixels=pixels, decode_ms=(t1 - t0) * 1e3, preprocess_ms=(t2 - t1) * 1e3)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)  # stable for large logits
    e = np.exp(shifted.astype(np.float64))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    """Top-k predictions of one image's logits (C,)."""
    probs = softmax(logits)
    k = min(k, len(labels))
    order = np.argsort(-probs, kind="stable")[:k]
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


def overlay_png(prepared: Prepared, heatmap: np.ndarray, meta: ArtifactMetadata, *, alpha: float, title: str) -> bytes:
    box = crop_box(prepared.image.size, meta.preprocessing)
    return render_overlay(prepared.image, heatmap, box=box, alpha=alpha, title=title)


def describe(method: str, params: AttentionParams, top: Prediction) -> str:
    parts = [method]
    if params.layer is not None:
        parts.append(f"layer {params.layer}")
    if params.head is not None:
        parts.append(f"head {params.head}")
    return " · ".join(parts) + f" · top: {top.label} {top.probability:.2f}"
