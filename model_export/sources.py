"""What every source adapter (own, Hugging Face, timm) hands to the exporter.

An adapter's job is small and declarative, in the manner of optimum's per-architecture export configs: load
the weights, wrap the model so `forward(pixel_values)` returns `(logits, attentions)` with attentions shaped
(B, layers, heads, tokens, tokens), and say what the artifact metadata needs (labels, sizes, preprocessing).
Any temporary patch a model needs to expose its attention lives in `patches`, a context manager active only
while exporting and computing the reference outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from vit_artifact.metadata import Preprocessing, Source


class ExportError(Exception):
    """A problem with what the user asked to export: the message says what and what to do."""


class UnsupportedModelError(ExportError):
    pass


class CheckpointError(ExportError):
    pass


class ParityError(ExportError):
    pass


@dataclass(frozen=True)
class Tolerance:
    """max |diff| <= atol + rtol * scale (+ rounding * noise where the source's own float32 rounding is measured),
    where scale is the largest |reference output| (logits: max |logit|)."""

    atol: float = 1e-4
    rtol: float = 1e-4
    rounding: float = 10.0  # ONNX runs the same float32 maths in another order: allow this many times its noise

    def bound(self, scale: float, noise: float = 0.0) -> float:
        return self.atol + self.rtol * scale + self.rounding * noise

    def describe(self, scale: float, noise: float | None = None) -> str:
        text = f"atol {self.atol:g} + rtol {self.rtol:g} x {scale:.3g}"
        if noise is not None:
            text += f" + {self.rounding:g} x the source's own float32 rounding {noise:.3g}"
        return text


DEFAULT_TOLERANCE = Tolerance()


@dataclass
class ExportSource:
    model: nn.Module  # eval mode; forward(pixel_values) -> (logits (B, C), attentions (B, L, H, N, N))
    labels: list[str]
    input_size: tuple[int, int]  # (height, width)
    patch_size: int
    num_layers: int
    num_heads: int
    num_prefix_tokens: int
    preprocessing: Preprocessing
    source: Source
    patches: Callable[[], AbstractContextManager[None]] = field(default=contextlib.nullcontext)
    checks: dict[str, float] = field(default_factory=dict)  # load-time checks' numbers, kept in the parity record

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size


class LogitsOnly(nn.Module):
    """The classify graph: the same model with the attention output dropped, so tracing prunes it away."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits, _ = self.inner(pixel_values)
        return logits


def read_labels(path: str | None, num_classes: int) -> list[str]:
    """Labels from a file (one per line, or a JSON list / {index: label} map), checked against the head."""
    import json
    from pathlib import Path

    if path is None:
        return [str(i) for i in range(num_classes)]
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"label file {path} does not exist")
    text = file.read_text(encoding="utf-8")
    labels: list[str]
    if file.suffix == ".json":
        data = json.loads(text)
        labels = [str(data[k]) for k in sorted(data, key=int)] if isinstance(data, dict) else [str(v) for v in data]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ExportError(
            f"label file {path} has {len(labels)} labels but the model's head has {num_classes} classes; "
            "give one label per class, in class-index order"
        )
    return labels
