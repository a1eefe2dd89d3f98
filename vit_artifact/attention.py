"""Attention maps: where a Vision Transformer's class token looks, as a (grid_h, grid_w) heat map.

Input is one image's attention probabilities as the attention graph exports them: `(L, H, N, N)`, per layer,
per head, each row a softmax over the N tokens (row = query, column = key). The first `num_prefix_tokens`
tokens are the class token (token 0) and, for DeiT, the distillation token; the remaining grid_h * grid_w
tokens are the patches in row-major order. Both numbers come from the artifact metadata.

Three methods, all returning a map normalised to [0, 1] (min subtracted, then divided by max):

- ``rollout``: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers",
  arXiv:2005.00928), as implemented in jacobgil/vit-explain. Per layer: fuse heads, optionally zero the
  smallest `discard_ratio` fraction of entries (never entry (0, 0), class to class), add the identity for the
  residual connection, `A = (W + I) / 2`, and renormalise rows. The rollout is `R = A_L @ ... @ A_1`; the map
  is the class token's row over the patch columns. Unlike vit-explain, rows are renormalised row-wise
  (vit-explain's `a / a.sum(dim=-1)` broadcasts over columns).
- ``cls``: the class token's attention to the patches in the last layer, heads fused.
- ``layer``: the same for any layer, heads fused or one head.

Layer and head indices are Python-style: -1 is the last layer. Out-of-range indices raise `NoSuchIndex`, bad
combinations of arguments raise `BadArguments` (both `AttentionArgumentError`: the caller's mistake, which the
service answers with 404 and 422). An attention array that does not match the artifact's grid and prefix tokens
is a fault of the artifact and raises `ValueError`.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

HeadFusion = Literal["mean", "max", "min"]
Method = Literal["rollout", "cls", "layer"]
HEAD_FUSIONS: tuple[str, ...] = get_args(HeadFusion)
METHODS: tuple[str, ...] = get_args(Method)


class AttentionArgumentError(Exception):
    """The arguments name no map: a caller's mistake, not the artifact's. `detail` is machine-readable."""

    def __init__(self, message: str, detail: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class BadArguments(AttentionArgumentError):
    """A method given arguments it does not take, or a value out of range."""


class NoSuchIndex(AttentionArgumentError):
    """A layer or head index beyond what the model has."""


# A map whose spread is below this fraction of its magnitude is constant up to rounding: stretching it to
# [0, 1] would only show float noise, so it becomes all zeros.
_FLAT_TOLERANCE = 1e-6


def fuse_heads(attn: np.ndarray, how: HeadFusion = "mean") -> np.ndarray:
    """Combine the heads: `(L, H, N, N) -> (L, N, N)`, or one layer `(H, N, N) -> (N, N)`."""
    if how == "mean":
        return attn.mean(axis=-3)
    if how == "max":
        return attn.max(axis=-3)
    if how == "min":
        return attn.min(axis=-3)
    raise BadArguments(f"head_fusion {how!r} is not one of {', '.join(HEAD_FUSIONS)}")


def normalize_map(values: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1]: subtract the minimum, divide by the new maximum; a constant map becomes zeros."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    span = high - low
    if span <= _FLAT_TOLERANCE * max(abs(low), abs(high)):
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / span).astype(np.float32)


def discard_lowest(fused: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the smallest `ratio` of one layer's fused attention entries, keeping entry (0, 0) (vit-explain).

    `fused` is `(N, N)`; returns a copy. `int(N * N * ratio)` entries are picked, smallest first (ties in
    index order); if (0, 0) is among them it is spared, so one fewer is zeroed.
    """
    flat = fused.reshape(-1).copy()  # (N*N,)
    count = int(flat.size * ratio)
    lowest = np.argsort(flat, kind="stable")[:count]
    flat[lowest[lowest != 0]] = 0.0
    return flat.reshape(fused.shape)  # (N, N)


def residual_attention(fused: np.ndarray) -> np.ndarray:
    """Account for the residual connection: `(W + I) / 2`, rows renormalised to sum to 1. `(N, N)`."""
    a = (fused + np.eye(fused.shape[-1])) / 2.0  # (N, N)
    return a / a.sum(axis=-1, keepdims=True)  # (N, N), every row sum >= 1/2 before, so never 0


def rollout_matrix(attn: np.ndarray, *, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """Rolled-out attention `R = A_L @ ... @ A_1` over all tokens: `(L, H, N, N) -> (N, N)`, rows sum to 1."""
    _check_discard_ratio(discard_ratio)
    fused = fuse_heads(np.asarray(attn, dtype=np.float64), head_fusion)  # (L, N, N)
    result = np.eye(fused.shape[-1])  # (N, N)
    for weights in fused:  # (N, N), first layer first
        kept = discard_lowest(weights, discard_ratio) if discard_ratio > 0 else weights  # (N, N)
        result = residual_attention(kept) @ result  # (N, N)
    return result


def rollout(
    attn: np.ndarray,
    *,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> np.ndarray:
    """Attention rollout map (Abnar & Zuidema 2020): `(L, H, N, N) -> (grid_h, grid_w)` in [0, 1]."""
    _check_attention(attn, num_prefix_tokens, grid)
    rolled = rollout_matrix(attn, head_fusion=head_fusion, discard_ratio=discard_ratio)  # (N, N)
    return _class_row_map(rolled, num_prefix_tokens, grid)


def cls_attention(
    attn: np.ndarray,
    *,
    layer: int = -1,
    head: int | None = None,
    head_fusion: HeadFusion = "mean",
    num_prefix_tokens: int,
    grid: tuple[int, int],
) -> np.ndarray:
    """The class token's attention to the patches in one layer: `(L, H, N, N) -> (grid_h, grid_w)` in [0, 1].

    `head=None` fuses the heads with `head_fusion`; otherwise only that head is used.
    """
    _check_attention(attn, num_prefix_tokens, grid)
    layer = check_index(layer, attn.shape[0], "layer")
    heads = np.asarray(attn[layer], dtype=np.float64)  # (H, N, N)
    # (N, N): the heads fused, or the one head asked for
    weights = fuse_heads(heads, head_fusion) if head is None else heads[check_index(head, heads.shape[0], "head")]
    return _class_row_map(weights, num_prefix_tokens, grid)


def per_layer_cls_maps(attn: np.ndarray, *, num_prefix_tokens: int, grid: tuple[int, int]) -> np.ndarray:
    """Class-token attention for every layer and head, each normalised: `(L, H, N, N) -> (L, H, gh, gw)`."""
    _check_attention(attn, num_prefix_tokens, grid)
    layers, heads = attn.shape[:2]
    maps = np.asarray(attn[:, :, 0, num_prefix_tokens:], dtype=np.float64)  # (L, H, gh*gw)
    maps = maps.reshape(layers, heads, *grid)  # (L, H, gh, gw)
    out = np.empty(maps.shape, dtype=np.float32)
    for i in range(layers):
        for j in range(heads):
            out[i, j] = normalize_map(maps[i, j])
    return out


def attention_map(
    attn: np.ndarray,
    *,
    method: Method,
    layer: int | None = None,
    head: int | None = None,
    head_fusion: HeadFusion | None = None,
    discard_ratio: float | None = None,
    num_prefix_tokens: int,
    grid: tuple[int, int],
) -> np.ndarray:
    """One attention map, `(L, H, N, N) -> (grid_h, grid_w)` in [0, 1], by `method`; checks the arguments.

    `None` means "not given". rollout takes `head_fusion` (default "mean") and `discard_ratio` in [0, 1)
    (default 0); cls takes `head_fusion`; layer needs `layer` and takes `head` or `head_fusion` (not both).
    Anything given to a method that does not take it raises `BadArguments` rather than being ignored.
    """
    _check_arguments(method, layer, head, head_fusion, discard_ratio)
    fusion: HeadFusion = head_fusion or "mean"
    if method == "rollout":
        return rollout(
            attn,
            num_prefix_tokens=num_prefix_tokens,
            grid=grid,
            head_fusion=fusion,
            discard_ratio=discard_ratio or 0.0,
        )
    chosen = -1 if layer is None else layer
    return cls_attention(
        attn, layer=chosen, head=head, head_fusion=fusion, num_prefix_tokens=num_prefix_tokens, grid=grid
    )


def check_index(index: int, count: int, what: Literal["layer", "head"]) -> int:
    """Resolve a Python-style index (-1 = last) into `range(count)`; `NoSuchIndex` when there is no such one."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise BadArguments(f"{what} must be an integer, got {index!r}")
    if not -count <= index < count:
        raise NoSuchIndex(
            f"{what} {index} does not exist; this model has {count} {what}s (0-{count - 1})",
            {what: int(index), f"num_{what}s": count},
        )
    return int(index) % count


def _check_arguments(
    method: str, layer: int | None, head: int | None, head_fusion: str | None, discard_ratio: float | None
) -> None:
    if method not in METHODS:
        raise BadArguments(f"method {method!r} is not one of {', '.join(METHODS)}")
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise BadArguments(f"head_fusion {head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}")
    if discard_ratio is not None:
        if method != "rollout":
            raise BadArguments(f"discard_ratio applies to method 'rollout', not {method!r}; leave it out")
        _check_discard_ratio(discard_ratio)
    if method == "layer":
        if layer is None:
            raise BadArguments("method 'layer' needs a layer index, e.g. layer=-1 for the last layer")
        if head is not None and head_fusion is not None:
            raise BadArguments("give either head (one head) or head_fusion (all heads fused), not both")
        return
    for name, value in (("layer", layer), ("head", head)):
        if value is not None:
            raise BadArguments(f"{name} applies to method 'layer', not {method!r}; use method=layer")


def _check_discard_ratio(discard_ratio: float) -> None:
    if not 0.0 <= discard_ratio < 1.0:
        raise BadArguments(
            f"discard_ratio {discard_ratio} is outside [0, 1); it is the fraction of weakest attention "
            "entries to drop per layer, e.g. 0.9"
        )


def _check_attention(attn: np.ndarray, num_prefix_tokens: int, grid: tuple[int, int]) -> None:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (layers, heads, tokens, tokens) for one image, got {attn.shape}")
    if num_prefix_tokens < 1:
        raise ValueError(f"num_prefix_tokens is {num_prefix_tokens}; a class token (token 0) is required")
    tokens = num_prefix_tokens + grid[0] * grid[1]
    if attn.shape[-1] != tokens:
        raise ValueError(
            f"attention has {attn.shape[-1]} tokens; {num_prefix_tokens} prefix + grid {tuple(grid)} "
            f"patches = {tokens}: the artifact metadata does not match its attention graph"
        )
    if not np.isfinite(attn).all():
        raise ValueError("attention contains NaN or infinite values")


def _class_row_map(weights: np.ndarray, num_prefix_tokens: int, grid: tuple[int, int]) -> np.ndarray:
    row = weights[0, num_prefix_tokens:]  # (gh*gw,), class token (query) over patch tokens (keys)
    return normalize_map(row.reshape(grid))  # (gh, gw)
