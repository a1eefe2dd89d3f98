"""Relevance maps the way the authors' code computes them (hila-chefer/Transformer-MM-Explainability): one
image at a time, `backward()` from the target logit, gradients read from the retained attention tensors, the
rule in float64. An implementation independent of `model_export.relevance`, for the tests to compare with."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from vit_artifact.attention import normalize_map

# image (1, 3, H, W) -> logits (1, C) and each block's attention probabilities (1, heads, N, N), in the graph
Forward = Callable[[Tensor], tuple[Tensor, Sequence[Tensor]]]


def autograd_relevance(
    forward: Forward,
    pixels: np.ndarray,
    targets: Sequence[int | None],
    *,
    num_prefix_tokens: int,
    grid: tuple[int, int],
) -> tuple[np.ndarray, list[int]]:
    """Raw maps (B, gh, gw) for each image's target (None: its top prediction), and the classes explained."""
    maps, explained = [], []
    for image, target in zip(pixels, targets, strict=True):
        logits, probs = forward(torch.from_numpy(np.ascontiguousarray(image[None])))
        for p in probs:
            p.retain_grad()
        chosen = int(logits[0].argmax()) if target is None else int(target)
        logits[0, chosen].backward()
        tokens = probs[0].shape[-1]
        relevance = np.eye(tokens)
        for p in probs:
            cam = p[0].detach().double().numpy() * p.grad[0].double().numpy()  # (heads, N, N)
            relevance = relevance + np.clip(cam, 0, None).mean(axis=0) @ relevance
        maps.append(relevance[0, num_prefix_tokens:].reshape(grid))
        explained.append(chosen)
    return np.stack(maps), explained


def normalised(maps: np.ndarray) -> np.ndarray:
    """Each map stretched to [0, 1] as the service serves it."""
    return np.stack([normalize_map(m) for m in maps])


def own_forward(model: torch.nn.Module) -> Forward:
    """The project's ViT with forward hooks on its attention modules (which return (output, probabilities))."""

    def forward(x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        probs: list[Tensor] = []
        hooks = [
            block.attn.register_forward_hook(lambda _m, _i, out: probs.append(out[1]))
            for block in model.blocks  # type: ignore[union-attr]
        ]
        try:
            return model(x), probs
        finally:
            for hook in hooks:
                hook.remove()

    return forward


def hf_forward(model: torch.nn.Module) -> Forward:
    def forward(x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        out = model(pixel_values=x, output_attentions=True)
        return out.logits, out.attentions

    return forward


def timm_forward(wrapper) -> Forward:  # model_export.from_timm.TimmWithAttention
    def forward(x: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        with wrapper.recording():
            logits = wrapper.model(x)
            return logits, list(wrapper.recorded)

    return forward
