"""Relevance maps as served: which class a request asks about, and the map drawn from the graph's output.

The relevance graph (`model_export/relevance.py`) takes a target class per image and returns the raw map of
Chefer, Gur & Wolf (ICCV 2021) on the patch grid; the map is served stretched to [0, 1] like every attention
map (`vit_artifact.attention.normalize_map`). A target is a class index or a label: a value that is one of the
model's labels is that label (so a label "7" at index 3 means index 3), otherwise an integer is an index.
No target means the image's top prediction, which the graph finds itself (target -1).
"""

from __future__ import annotations

import numpy as np

from vit_artifact.attention import BadArguments, normalize_map

TOP_PREDICTION = -1  # the graph's target for "whatever the model predicts"
_LISTED_LABELS = 50  # an error lists the labels when there are at most this many


def resolve_target(value: str | int | None, labels: list[str]) -> int:
    """The class index `value` names (`TOP_PREDICTION` for None); `BadArguments` naming the valid ones if none."""
    if value is None:
        return TOP_PREDICTION
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    try:
        index = int(text)
    except ValueError:
        index = None
    if index is not None and 0 <= index < len(labels):
        return index
    valid = f"a class index 0-{len(labels) - 1}"
    listed = labels if len(labels) <= _LISTED_LABELS else None
    raise BadArguments(
        f"target {text!r} is neither {valid} nor one of the model's labels"
        + (f" ({', '.join(labels)})" if listed else f" ({len(labels)} labels, listed by GET /v1/models)"),
        {"target": text, "min_index": 0, "max_index": len(labels) - 1, "labels": listed},
    )


def relevance_grid(raw: np.ndarray) -> np.ndarray:
    """One image's raw relevance (grid_h, grid_w) -> the served map in [0, 1]."""
    if raw.ndim != 2 or not np.isfinite(raw).all():
        raise ValueError(f"a relevance map must be a finite (grid_h, grid_w) array, got shape {raw.shape}")
    return normalize_map(raw)
