"""Digits on a cluttered canvas: the default model's data, built from scikit-learn's handwritten digits.

`sklearn.datasets.load_digits` ships 1,797 8x8 digits inside the wheel (no download). Each is scaled and
placed at a random position on a larger noisy canvas with clutter strokes, so *where the digit is* matters and
an attention map can be checked against the box the digit was placed in (the pointing game).

Train and held-out sets are split by source image: a held-out digit was never seen in any placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

LABELS = [str(d) for d in range(10)]
HELD_OUT_SEED = 123  # the held-out canvases are fixed: every evaluation of every artifact sees the same set
HELD_OUT_COPIES = 4


@dataclass(frozen=True)
class CanvasSpec:
    size: int = 32
    digit_min: int = 12  # the 8x8 digit is upscaled to a random side in [digit_min, digit_max]
    digit_max: int = 18
    noise_std: float = 12.0  # Gaussian background noise, in 0..255 units
    clutter: tuple[int, int] = (1, 4)  # how many clutter strokes, low..high inclusive
    max_rotation: float = 0.0  # degrees; training sets rotate digits a little so held-out writers generalise


@dataclass(frozen=True)
class Canvases:
    images: np.ndarray  # (N, size, size) uint8, ink bright on dark
    labels: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) int: left, top, right, bottom (exclusive) of the placed digit
    sources: np.ndarray  # (N,) index into sklearn's digits


def load_sources() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    return images, digits.target.astype(np.int64)


def split_sources(n: int, *, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and held-out source digits (disjoint; a held-out digit is never trained on)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = round(n * (1 - held_out_fraction))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _stroke(canvas: np.ndarray, rng: np.random.Generator, avoid: tuple[int, int, int, int]) -> None:
    """Draw one short straight clutter stroke that does not touch the digit's box."""
    size = canvas.shape[0]
    left, top, right, bottom = avoid
    for _ in range(20):
        x0, y0 = rng.integers(0, size, 2)
        length = rng.integers(3, 8)
        angle = rng.uniform(0, np.pi)
        xs = np.clip(np.round(x0 + np.cos(angle) * np.arange(length)).astype(int), 0, size - 1)
        ys = np.clip(np.round(y0 + np.sin(angle) * np.arange(length)).astype(int), 0, size - 1)
        inside = (xs >= left - 1) & (xs <= right) & (ys >= top - 1) & (ys <= bottom)
        if not inside.any():
            canvas[ys, xs] = np.maximum(canvas[ys, xs], rng.uniform(70, 170))
            return


def render(digit: np.ndarray, rng: np.random.Generator, spec: CanvasSpec) -> tuple[np.ndarray, tuple]:
    """One canvas (size, size) uint8 and the digit's box (left, top, right, bottom)."""
    side = int(rng.integers(spec.digit_min, spec.digit_max + 1))
    glyph = Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR)
    if spec.max_rotation:
        glyph = glyph.rotate(rng.uniform(-spec.max_rotation, spec.max_rotation), Image.Resampling.BILINEAR)
    scaled = np.asarray(glyph, np.float32)
    left, top = (int(v) for v in rng.integers(0, spec.size - side + 1, 2))
    box = (left, top, left + side, top + side)
    canvas = np.abs(rng.normal(0.0, spec.noise_std, (spec.size, spec.size))).astype(np.float32)
    for _ in range(int(rng.integers(spec.clutter[0], spec.clutter[1] + 1))):
        _stroke(canvas, rng, box)
    region = canvas[top : top + side, left : left + side]
    canvas[top : top + side, left : left + side] = np.maximum(region, scaled * rng.uniform(0.75, 1.0))
    return np.clip(canvas, 0, 255).astype(np.uint8), box


def make_canvases(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    copies: int,
    seed: int,
    spec: CanvasSpec = CanvasSpec(),
) -> Canvases:
    """`copies` random placements of each source digit in `indices`, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    sources = np.repeat(indices, copies)
    out = np.empty((len(sources), spec.size, spec.size), np.uint8)
    boxes = np.empty((len(sources), 4), np.int64)
    for i, src in enumerate(sources):
        out[i], boxes[i] = render(images[src], rng, spec)
    return Canvases(images=out, labels=labels[sources], boxes=boxes, sources=sources)


def pointing_hits(maps: np.ndarray, boxes: np.ndarray, image_size: int) -> np.ndarray:
    """For each (grid_h, grid_w) map: does its maximum's cell centre fall inside the digit's box?"""
    n, gh, gw = maps.shape
    flat = maps.reshape(n, -1).argmax(axis=1)
    rows, cols = np.divmod(flat, gw)
    cy = (rows + 0.5) * image_size / gh
    cx = (cols + 0.5) * image_size / gw
    left, top, right, bottom = boxes.T
    return (cx >= left) & (cx < right) & (cy >= top) & (cy < bottom)


def held_out_set(spec: CanvasSpec = CanvasSpec()) -> Canvases:
    """The fixed held-out canvases: placements of digits that training never saw."""
    images, labels = load_sources()
    _, held_out = split_sources(len(images))
    return make_canvases(images, labels, held_out, copies=HELD_OUT_COPIES, seed=HELD_OUT_SEED, spec=spec)
