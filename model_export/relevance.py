"""Class-specific relevance maps (Chefer, Gur & Wolf, ICCV 2021, arXiv:2103.15679) and their ONNX graph.

The rule, for one image and a target class t: start from R = I (tokens x tokens); for each block b, first to
last, with A_b its attention probabilities (heads, N, N) and G_b = d y_t / d A_b the gradient of the target's
logit (before the softmax over classes),

    Abar_b = mean over heads of clamp(G_b * A_b, min=0)        R = R + Abar_b @ R

and the map is the class token's row over the patch tokens, `R[0, num_prefix_tokens:]`, on the patch grid.

The gradient is what makes the map class-specific: attention alone is the same whatever class one asks about.
The serving process has no autograd, so the gradient is computed inside the graph: `make_fx` traces the
forward pass *and* the backward pass autograd runs for `torch.autograd.grad` into one graph of plain tensor
ops (backward ops decomposed into primitives), which the dynamo ONNX exporter turns into an ONNX graph with a
dynamic batch axis. `relevance_maps` is the one implementation: run eagerly it is the PyTorch autograd
reference the export gate compares the graph with.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol

import onnx
import torch
from torch import Tensor, nn

from vit_artifact.metadata import INPUT_NAME, LOGITS, RELEVANCE, TARGET_NAME

log = logging.getLogger(__name__)

RELEVANCE_FILE = "relevance.onnx"
# The dynamo exporter writes opset 18 at the least; onnxruntime has run it since 1.14.
MIN_RELEVANCE_OPSET = 18


class BlockAttentionModel(Protocol):
    def forward_blocks(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits (B, C) and each block's attention probabilities (B, heads, N, N), the tensors the blocks
        multiply with their values."""
        ...


def relevance_maps(
    model: BlockAttentionModel,
    pixel_values: Tensor,
    target: Tensor,
    *,
    num_prefix_tokens: int,
    grid: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Logits (B, C) and raw relevance maps (B, grid_h, grid_w) for `target` (B,) int64, one class per image
    (-1: the image's top prediction)."""
    with torch.enable_grad():
        # a differentiable input makes the attention differentiable even where every parameter is frozen
        pixels = pixel_values.detach().requires_grad_(True)
        logits, probs = model.forward_blocks(pixels)
        # a negative target asks for the top prediction, so one run answers "explain what you see"
        target = torch.where(target < 0, logits.argmax(dim=1), target.long())
        # images in a batch never interact (eval mode), so the gradient of the sum is each image's own
        chosen = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(chosen, probs)
    batch, tokens = pixels.shape[0], probs[0].shape[-1]
    relevance = torch.eye(tokens, dtype=logits.dtype).expand(batch, tokens, tokens)  # (B, N, N)
    for attention, grad in zip(probs, grads, strict=True):
        weighted = (grad * attention).clamp(min=0).mean(dim=1)  # (B, N, N): heads averaged after the clamp
        relevance = relevance + weighted @ relevance  # (B, N, N)
    maps = relevance[:, 0, num_prefix_tokens:].reshape(batch, *grid)  # (B, gh, gw): class token over patches
    return logits.detach(), maps.detach()


class _RelevanceFunction(nn.Module):
    def __init__(self, model: nn.Module, num_prefix_tokens: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid

    def forward(self, pixel_values: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return relevance_maps(
            self.model,  # type: ignore[arg-type]  # every source wrapper has forward_blocks
            pixel_values,
            target,
            num_prefix_tokens=self.num_prefix_tokens,
            grid=self.grid,
        )


def export_relevance(
    model: nn.Module,
    dummy: Tensor,
    path: Path,
    *,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    opset: int,
) -> None:
    """Trace forward + backward into one graph and write it as a single ONNX file (weights inside)."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    function = _RelevanceFunction(model, num_prefix_tokens, grid).eval()
    decompositions: Any = core_aten_decompositions()  # a dict subclass that make_fx's annotation does not name
    target = torch.zeros(dummy.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # symbolic shapes keep the batch axis a variable through the backward pass's reshapes; the parameters
        # are real tensors and become constants of the graph
        joint = make_fx(
            function,
            decomposition_table=decompositions,
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(dummy, target)
        batch = torch.export.Dim("batch")
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / path.name
            torch.onnx.export(
                joint,
                (dummy, target),
                str(staged),
                input_names=[INPUT_NAME, TARGET_NAME],
                output_names=[LOGITS, RELEVANCE],
                dynamic_shapes=({0: batch}, {0: batch}),
                opset_version=max(opset, MIN_RELEVANCE_OPSET),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            graph = onnx.load(str(staged))
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
