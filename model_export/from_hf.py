"""Hugging Face `transformers` ViT and DeiT classifiers as an `ExportSource`.

Supported: `ViTForImageClassification`, `DeiTForImageClassification` and
`DeiTForImageClassificationWithTeacher` (whose logits are the mean of its class-token and distillation-token
heads, as transformers computes them at inference). The model is loaded with eager attention, so
`output_attentions=True` returns the real softmax probabilities and no patch is needed at export time.

Preprocessing is read from the directory's image processor (PIL backend: the service's Pillow pipeline is its
counterpart); without a `preprocessor_config.json` the class defaults are used, scaled to the model's image
size. A processor step the artifact record cannot express is refused rather than approximated.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    DeiTImageProcessorPil,
    PreTrainedConfig,
    PreTrainedModel,
    ViTImageProcessorPil,
)
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.processing_utils import ImagesKwargs

from vit_artifact.metadata import Interpolation, Preprocessing, Source

from .sources import CheckpointError, ExportSource, UnsupportedModelError, read_labels

log = logging.getLogger(__name__)

# architecture -> tokens before the patches (DeiT puts a distillation token after the class token)
ARCHITECTURES: dict[str, int] = {
    "ViTForImageClassification": 1,
    "DeiTForImageClassification": 2,
    "DeiTForImageClassificationWithTeacher": 2,
}
# for a config.json without `architectures`: what AutoModelForImageClassification would build
_BY_MODEL_TYPE = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}

_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL codes
_PROCESSOR_FILE = "preprocessor_config.json"
_WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")  # in the order from_pretrained prefers them


class HFWithAttention(nn.Module):
    """`forward(pixel_values) -> (logits (B, C), attentions (B, layers, heads, tokens, tokens))`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        logits, attentions = self.forward_blocks(pixel_values)
        return logits, torch.stack(attentions, dim=1)  # L x (B, H, N, N) -> (B, L, H, N, N)

    def forward_blocks(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and each layer's probabilities: eager attention returns the tensor it multiplies with the
        values (dropout is the identity in eval mode), so gradients with respect to it are well defined."""
        out = self.model(pixel_values=pixel_values, output_attentions=True, return_dict=True)
        return out.logits, list(out.attentions)


def load_hf(source: str, *, labels_file: str | None = None) -> ExportSource:
    """A transformers ViT/DeiT classifier from a `save_pretrained` directory (or a hub id)."""
    architecture = _architecture(source, _read_config(source))
    model = _load_model(source, architecture)
    config = model.config
    input_size = _pair(config.image_size)
    patch_h, patch_w = _pair(config.patch_size)
    if patch_h != patch_w:
        raise UnsupportedModelError(f"{source}: non-square patches {patch_h}x{patch_w} are not supported")
    if config.num_channels != 3:
        raise UnsupportedModelError(f"{source}: the model takes {config.num_channels} channels, not RGB")
    num_classes = config.num_labels or 0
    if num_classes <= 0:
        raise UnsupportedModelError(f"{source}: the model has no classifier head (num_labels=0)")
    labels = read_labels(labels_file, num_classes) if labels_file else _id2label(config.id2label or {}, num_classes)
    return ExportSource(
        model=HFWithAttention(model).eval(),
        labels=labels,
        input_size=input_size,
        patch_size=patch_h,
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        num_prefix_tokens=ARCHITECTURES[architecture],
        preprocessing=_preprocessing(source, config.model_type, input_size),
        source=Source(
            framework="transformers",
            model=f"{architecture} {model.name_or_path}",
            checkpoint=Path(source).name if Path(source).is_dir() else source,
            checkpoint_sha256=_weights_sha256(source),
        ),
    )


# --- loading -----------------------------------------------------------------------------------------------


def _read_config(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{source} is a file; give the directory written by save_pretrained")
    if not path.exists():
        try:
            validate_repo_id(source)
        except HFValidationError as e:  # a path, not a hub id: do not send it to the hub
            raise CheckpointError(f"{source}: no such directory (give one written by save_pretrained)") from e
    elif not (path / "config.json").is_file():
        raise CheckpointError(f"{source} has no config.json; is it a directory written by save_pretrained?")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(source)
    except OSError as e:  # config.json not JSON, unknown hub id, no network
        where = "" if path.is_dir() else "not a local directory, and from the hub: "
        raise CheckpointError(f"{source}: cannot read the model config: {where}{e}") from e
    return config_dict


def _architecture(source: str, config_dict: dict[str, Any]) -> str:
    model_type = config_dict.get("model_type")
    architectures = config_dict.get("architectures") or []
    found = architectures[0] if architectures else _BY_MODEL_TYPE.get(str(model_type))
    if found not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source} holds a {found or 'model'} (model_type {model_type!r}); vitserve exports "
            f"{', '.join(ARCHITECTURES)} (model_type 'vit' or 'deit')"
        )
    return found


def _load_model(source: str, architecture: str) -> PreTrainedModel:
    cls = getattr(transformers, architecture)
    try:
        # eager: the one attention implementation that returns probabilities. float32: transformers 5 loads
        # with dtype="auto", which would keep a half-precision checkpoint in half precision.
        model, info = cls.from_pretrained(
            source, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        raise CheckpointError(f"{source}: cannot load the {architecture} weights: {e}") from e
    # from_pretrained fills missing weights with random values and only warns: that must not reach an artifact
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise CheckpointError(
            f"{source}: the weights do not fit {architecture}: {len(missing)} parameters are missing or of "
            f"another shape ({_first(missing)}); is the architecture in config.json right?"
        )
    if info["unexpected_keys"]:
        unused = sorted(info["unexpected_keys"])
        log.warning(
            "%s: ignoring %d weights %s has no place for (%s)", source, len(unused), architecture, _first(unused)
        )
    return model.eval()


def _first(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _id2label(id2label: Mapping[Any, str], num_classes: int) -> list[str]:
    return [str(id2label.get(i, i)) for i in range(num_classes)]  # the config turns JSON's keys back into ints


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def _weights_sha256(source: str) -> str | None:
    """sha256 over the weight files in name order (for a single file, what `sha256sum` prints)."""
    directory = Path(source) if Path(source).is_dir() else _hub_snapshot(source)
    files = _weight_files(directory) if directory else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    for pattern in _WEIGHT_PATTERNS:
        if files := sorted(directory.glob(pattern)):
            return files
    return []


def _hub_snapshot(repo_id: str) -> Path | None:
    """The hub cache folder from_pretrained just filled, found without the network."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any failure here only means the record goes without a hash
        log.warning("%s: weights not found in the local hub cache; the artifact records no sha256", repo_id)
        return None


# --- preprocessing -----------------------------------------------------------------------------------------


def _preprocessing(source: str, model_type: str, input_size: tuple[int, int]) -> Preprocessing:
    if Path(source).is_dir() and not (Path(source) / _PROCESSOR_FILE).is_file():
        return _default_preprocessing(source, model_type, input_size)
    try:
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")  # use_fast=False is deprecated
    except OSError:  # a hub repo without a processor config
        return _default_preprocessing(source, model_type, input_size)
    except ValueError as e:
        raise UnsupportedModelError(f"{source}: cannot read its {_PROCESSOR_FILE}: {e}") from e
    spec = processor_preprocessing(processor, where=f"{source}: {_PROCESSOR_FILE}")
    if tuple(spec.crop_size) != input_size:
        raise UnsupportedModelError(
            f"{source}: the image processor makes {spec.crop_size} images but the model takes {input_size}"
        )
    return spec


def _default_preprocessing(source: str, model_type: str, input_size: tuple[int, int]) -> Preprocessing:
    """What `ViTImageProcessor()` / `DeiTImageProcessor()` would do, scaled to the model's image size."""
    h, w = input_size
    processor: PilBackend
    if model_type == "deit":  # DeiT resizes to 256 and crops 224: keep that ratio at other sizes
        size = {"height": math.floor(h * 256 / 224), "width": math.floor(w * 256 / 224)}
        processor = DeiTImageProcessorPil(size=size, crop_size={"height": h, "width": w})
    else:
        processor = ViTImageProcessorPil(size={"height": h, "width": w})
    name = type(processor).__name__.removesuffix("Pil")
    log.warning(
        "%s has no %s: using %s defaults at %dx%d. If the model was trained with other preprocessing, "
        "save its image processor into the directory (processor.save_pretrained).",
        source,
        _PROCESSOR_FILE,
        name,
        h,
        w,
    )
    return processor_preprocessing(processor, where=f"{name} defaults")


def processor_preprocessing(processor: Any, *, where: str) -> Preprocessing:
    """The artifact record for a transformers image processor; refuses steps the record cannot express."""
    _check_standard_steps(processor, where)
    if not processor.do_resize:
        raise UnsupportedModelError(
            f"{where}: do_resize is false, so the processor only takes images already at the model's size, "
            "and vitserve resizes every image; set do_resize and size"
        )
    resize, resize_size = _resize(processor.size, where)
    if processor.do_center_crop:
        crop_size = _height_width(processor.crop_size)
    elif resize == "squash":
        crop_size = resize_size
    else:
        raise UnsupportedModelError(
            f"{where}: resizing the shortest edge without a centre crop makes images of varying size"
        )
    # padding to the batch's largest image is a no-op here: every image already has the crop size
    if processor.do_pad and processor.pad_size is not None and _height_width(processor.pad_size) != crop_size:
        raise UnsupportedModelError(f"{where}: padding to {processor.pad_size} is not supported")
    normalize = bool(processor.do_normalize)
    try:
        return Preprocessing(
            resize=resize,
            resize_size=resize_size,
            crop_size=crop_size,
            interpolation=_interpolation(processor.resample, where),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else 1.0,
            mean=_per_channel(processor.image_mean, where) if normalize else (0.0, 0.0, 0.0),
            std=_per_channel(processor.image_std, where) if normalize else (1.0, 1.0, 1.0),
            crop_offset="floor",  # transformers' center_crop: (size - crop) // 2
        )
    except ValueError as e:  # the record's own checks: crop larger than the resize, std <= 0
        raise UnsupportedModelError(f"{where}: {e}") from e


def _check_standard_steps(processor: Any, where: str) -> None:
    """The record can only say what the base backends' resize, crop, rescale and normalize do."""
    backend = next((b for b in (PilBackend, TorchvisionBackend) if isinstance(processor, b)), None)
    steps = ("_preprocess", "resize", "center_crop", "rescale", "normalize")
    if (
        backend is None
        or processor.valid_kwargs is not ImagesKwargs
        or any(getattr(type(processor), step) is not getattr(backend, step) for step in steps)
    ):
        raise UnsupportedModelError(
            f"{where}: {type(processor).__name__} has its own preprocessing steps, which vitserve cannot "
            "reproduce; use a ViTImageProcessor or DeiTImageProcessor config"
        )


def _resize(size: Any, where: str) -> tuple[Literal["squash", "shortest_edge"], tuple[int, int]]:
    if size.height and size.width and not (size.shortest_edge or size.longest_edge):
        return "squash", _height_width(size)
    if size.shortest_edge and not (size.longest_edge or size.height or size.width):
        return "shortest_edge", (int(size.shortest_edge), int(size.shortest_edge))
    raise UnsupportedModelError(
        f"{where}: resizing to {size} is not supported; use {{'height', 'width'}} or {{'shortest_edge'}}"
    )


def _height_width(size: Any) -> tuple[int, int]:
    return int(size.height), int(size.width)


def _interpolation(resample: Any, where: str) -> Interpolation:
    code = 2 if resample is None else int(resample)  # transformers resizes bilinear when unset
    if code not in _RESAMPLE:
        raise UnsupportedModelError(
            f"{where}: resample={resample} is not supported; use nearest (0), lanczos (1), bilinear (2) or bicubic (3)"
        )
    return _RESAMPLE[code]


def _per_channel(value: float | Sequence[float], where: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return float(value), float(value), float(value)
    if len(value) != 3:
        raise UnsupportedModelError(f"{where}: mean/std {list(value)} do not have one value per RGB channel")
    r, g, b = (float(v) for v in value)
    return r, g, b
