"""timm Vision Transformers (`vit_*`, `deit_*`, distilled and register-token variants) as an `ExportSource`.

timm's `Attention.forward` calls fused `scaled_dot_product_attention`, which never materialises the softmax
probabilities. The source's `patches` context swaps each block's attention forward for the same computation
with an explicit softmax that records the probabilities; outside it the model is untouched timm. At load time
the patched forward is checked against timm's own on a random input, so a timm release that changes
`Attention` is refused instead of exported wrong.

Preprocessing is timm's eval transform (`transforms_imagenet_eval`) for the model's data config: resize the
shortest edge to floor(size / crop_pct), centre-crop to the input size, normalise with the model's mean/std.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError
from timm.data import resolve_data_config
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from vit_artifact.metadata import Interpolation, Preprocessing, Source, sha256_file

from .sources import (
    DEFAULT_TOLERANCE,
    CheckpointError,
    ExportSource,
    ParityError,
    Tolerance,
    UnsupportedModelError,
    read_labels,
)

log = logging.getLogger(__name__)

_INTERPOLATIONS: tuple[Interpolation, ...] = ("nearest", "bilinear", "bicubic", "lanczos")
_WRAPPER_KEYS = ("state_dict", "model")  # training scripts save {"state_dict": ...} or {"model": ...}
PATCH_CHECK = "timm_patch_max_abs_logit_diff"  # the parity record's `extra` key for the load-time check


def load_timm(
    model_name: str,
    *,
    checkpoint: str | None,
    num_classes: int | None = None,
    labels_file: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> ExportSource:
    """A timm ViT/DeiT, built by `timm.create_model(model_name, **model_kwargs)`, loaded from `checkpoint`.

    `num_classes` defaults to the checkpoint's head size. `model_kwargs` are the architecture arguments the
    checkpoint was trained with where they differ from the name's defaults (e.g. `img_size=384`).
    `checkpoint=None` keeps random weights: fine for speed benchmarks, useless for predictions.
    `tolerance` judges the attention-recording forward against timm's fused one, as the export's parity gate.
    """
    _check_known(model_name)
    state = None
    if checkpoint:
        state = _read_state_dict(checkpoint)
        num_classes = _resolve_num_classes(state, num_classes, checkpoint)
    else:
        log.warning("no checkpoint: %s keeps random weights; its predictions mean nothing", model_name)
    model = _check_supported(model_name, _create(model_name, num_classes, model_kwargs or {}))
    if state is not None and checkpoint:
        _load_weights(model, state, model_name, checkpoint)
    model.eval()

    input_size, patch_size = _geometry(model_name, model)
    wrapper = TimmWithAttention(model)
    patch_diff = _check_patch_matches_timm(wrapper, input_size, model_name, tolerance)
    return ExportSource(
        model=wrapper,
        labels=read_labels(labels_file, int(model.num_classes)),
        input_size=input_size,
        patch_size=patch_size,
        num_layers=len(wrapper.attention_modules),
        num_heads=wrapper.attention_modules[0].num_heads,
        num_prefix_tokens=int(model.num_prefix_tokens),  # class + distillation + register tokens
        preprocessing=_preprocessing(model_name, model, input_size),
        source=Source(
            framework="timm",
            model=model_name,
            checkpoint=Path(checkpoint).name if checkpoint else None,
            checkpoint_sha256=sha256_file(Path(checkpoint)) if checkpoint else None,
        ),
        patches=wrapper.recording,
        checks={PATCH_CHECK: patch_diff},
    )


# --- attention probabilities -------------------------------------------------------------------------------


class TimmWithAttention(nn.Module):
    """`forward(pixel_values) -> (logits (B, C), attentions (B, layers, heads, tokens, tokens))`.

    The attentions exist only inside `recording()`; outside it forward raises, rather than run timm's fused
    path and return nothing.
    """

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model
        self.attention_modules = [cast(Attention, block.attn) for block in model.blocks]  # checked: exactly Attention
        self.recorded: list[Tensor] = []  # appended to by the patched attention forwards, one per block

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        logits, attentions = self.forward_blocks(pixel_values)
        return logits, torch.stack(attentions, dim=1)  # L x (B, H, N, N) -> (B, L, H, N, N)

    def forward_blocks(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and each block's probabilities, the tensors multiplied with the values."""
        self.recorded.clear()
        logits = self.model(pixel_values)
        if len(self.recorded) != len(self.attention_modules):
            raise RuntimeError(
                f"recorded {len(self.recorded)} attention maps for {len(self.attention_modules)} blocks; "
                "call the model inside `source.patches()`"
            )
        attentions = list(self.recorded)
        self.recorded.clear()  # hold no activations between calls
        return logits, attentions

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """While active, every block's attention computes an explicit softmax and records it."""
        # an instance attribute shadows the class's forward; nn.Module.__call__ then runs it
        saved = [vars(m).get("forward") for m in self.attention_modules]  # normally None: no instance forward
        try:
            for m in self.attention_modules:
                vars(m)["forward"] = functools.partial(_attention_recording_probs, m, self.recorded)
            yield
        finally:
            for m, forward in zip(self.attention_modules, saved, strict=True):
                if forward is None:
                    vars(m).pop("forward", None)  # back to Attention.forward
                else:
                    vars(m)["forward"] = forward
            self.recorded.clear()


def _attention_recording_probs(
    attn: Attention,
    recorded: list[Tensor],
    x: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """timm 1.0's `Attention.forward` on its non-fused path, recording the softmax probabilities.

    Straight-line tensor code (the branches test module configuration, not data), so `torch.jit.trace` and the
    TorchScript ONNX exporter record it exactly.
    """
    if attn_mask is not None or is_causal:
        raise NotImplementedError("attention masks are not used in image classification, nor supported here")
    b, n, _ = x.shape
    gate_layer = getattr(attn, "gate", None)  # gated variants; older timm has no such attribute
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)  # identity unless qk_norm
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
    probs = scores.softmax(dim=-1)
    recorded.append(probs)
    out = attn.attn_drop(probs) @ v  # (B, heads, N, head_dim)
    out = out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    out = attn.norm(out)  # identity unless scale_norm
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _check_patch_matches_timm(
    wrapper: TimmWithAttention, input_size: tuple[int, int], name: str, tolerance: Tolerance
) -> float:
    """The export's reference outputs come from the patched forward, so it must compute timm's logits.

    Fused and explicit attention round differently, more so where attention is sharp and logits are large, so
    the bound scales with the logits. Returns the measured max |logit diff|.
    """
    x = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper.model(x)
        with wrapper.recording():
            logits, _ = wrapper(x)
    diff = float((logits - expected).abs().max())
    scale = float(expected.abs().max())
    if not diff <= tolerance.bound(scale):  # `not <=` also catches NaN
        raise ParityError(
            f"{name}: the attention-recording forward differs from timm's by up to {diff:.3g}, over the tolerance "
            f"{tolerance.bound(scale):.3g} ({tolerance.describe(scale)}). If that is float rounding (a model with "
            f"sharp attention and large logits), raise --rtol; otherwise this timm version ({timm.__version__}) "
            "changed Attention in a way vitserve does not follow"
        )
    return diff


# --- building and loading ----------------------------------------------------------------------------------


def _check_known(model_name: str) -> None:
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnsupportedModelError(
        f"timm has no model named {model_name!r}; {hint}list names with "
        "`python -c \"import timm; print(timm.list_models('vit_*'))\"`"
    )


def _create(model_name: str, num_classes: int | None, model_kwargs: Mapping[str, Any]) -> nn.Module:
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # unknown or inconsistent arguments
        raise UnsupportedModelError(f"cannot build timm model {model_name} with {kwargs}: {e}") from e


def _check_supported(model_name: str, model: nn.Module) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{model_name} is a {type(model).__name__}; vitserve exports timm's VisionTransformer family "
            "(vit_*, deit_*, their distilled and register-token variants)"
        )
    if model.cls_token is None:
        # Attention maps are the class token's row. Pooling may ignore that token (global_pool="avg"): the
        # maps then show what the class token attends to, not what the head reads, but they exist.
        raise UnsupportedModelError(
            f"{model_name} has no class token (global_pool={model.global_pool!r}); vitserve's attention maps "
            "are read from the class token's attention"
        )
    if model.num_classes <= 0:
        raise UnsupportedModelError(f"{model_name} has no classifier head (num_classes=0)")
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(attn) is not Attention:  # subclasses (e.g. DiffAttention) compute something else
            raise UnsupportedModelError(
                f"{model_name}: block {i} is a {type(block).__name__} with {type(attn).__name__} attention; "
                "vitserve can record the probabilities of timm's standard Attention only"
            )
    return model


def _read_state_dict(path: str) -> dict[str, Tensor]:
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if file.suffix == ".safetensors":
            loaded: Any = safetensors.torch.load_file(file)
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses pickled Python objects
        raise CheckpointError(
            f"{path}: holds Python objects besides tensors, which vitserve does not unpickle; "
            f"save only the state dict (torch.save(model.state_dict(), path)). Detail: {e}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch or safetensors checkpoint: {e}") from e
    return _unwrap(loaded, path)


def _unwrap(loaded: Any, path: str) -> dict[str, Tensor]:
    """A raw state dict, or one under "state_dict"/"model"; DataParallel's "module." prefix dropped."""
    if isinstance(loaded, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"{path}: not a state dict (a mapping of parameter names to tensors, raw or under "
            f"{' or '.join(repr(k) for k in _WRAPPER_KEYS)})"
        )
    if all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return loaded


def _resolve_num_classes(state: Mapping[str, Tensor], num_classes: int | None, path: str) -> int | None:
    head = state.get("head.weight")  # every VisionTransformer's classifier is `head`
    if head is None or head.ndim != 2:
        return num_classes  # the key check in _load_weights reports what is missing
    in_checkpoint = int(head.shape[0])
    if num_classes is not None and num_classes != in_checkpoint:
        raise CheckpointError(f"{path}: checkpoint head has {in_checkpoint} classes but --num-classes is {num_classes}")
    return in_checkpoint


def _load_weights(model: nn.Module, state: Mapping[str, Tensor], model_name: str, path: str) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = [
        f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(items)} {what} ({_first(items)})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{path} does not fit {model_name}: parameters {'; '.join(problems)}. Check the model name and "
            "the architecture arguments it was trained with (img_size, ...)"
        )
    model.load_state_dict(state, strict=True)


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _geometry(model_name: str, model: VisionTransformer) -> tuple[tuple[int, int], int]:
    """Input size and the pixels per token side (for hybrid stems: the backbone stride times the patch)."""
    h, w = (int(v) for v in model.patch_embed.img_size)
    grid_h, grid_w = (int(v) for v in model.patch_embed.grid_size)
    patch = h // grid_h
    if (grid_h * patch, grid_w * patch) != (h, w):
        raise UnsupportedModelError(
            f"{model_name}: a {grid_h}x{grid_w} token grid does not tile a {h}x{w} input in square patches"
        )
    return (h, w), patch


# --- preprocessing -----------------------------------------------------------------------------------------


def _preprocessing(name: str, model: nn.Module, input_size: tuple[int, int]) -> Preprocessing:
    """The record for timm's eval transform of `model` at `input_size`."""
    config = resolve_data_config({}, model=model)
    if tuple(config["input_size"][1:]) != input_size:
        # the pretrained config keeps the name's resolution even when img_size=... built another one
        log.warning(
            "%s: the data config says %s but the model takes %s; using the model's size with the config's crop_pct",
            name,
            tuple(config["input_size"][1:]),
            input_size,
        )
    if config["crop_mode"] != "center":
        raise UnsupportedModelError(f"{name}: crop_mode {config['crop_mode']!r} is unsupported (only center)")
    interpolation = config["interpolation"]
    if interpolation not in _INTERPOLATIONS:
        raise UnsupportedModelError(f"{name}: interpolation {interpolation!r} is not supported")
    # transforms_imagenet_eval: scale = floor(size / crop_pct); a square scale is torchvision's Resize(int)
    crop_pct = float(config["crop_pct"])
    scale = tuple(math.floor(s / crop_pct) for s in input_size)
    if scale[0] != scale[1]:
        raise UnsupportedModelError(f"{name}: non-square input {input_size} (ResizeKeepRatio) is unsupported")
    return Preprocessing(
        resize="shortest_edge",
        resize_size=(scale[0], scale[1]),
        crop_size=input_size,
        interpolation=interpolation,
        rescale_factor=1 / 255,  # torchvision's ToTensor
        mean=_rgb(config["mean"]),
        std=_rgb(config["std"]),
        crop_offset="round",  # torchvision's CenterCrop
    )


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return r, g, b
