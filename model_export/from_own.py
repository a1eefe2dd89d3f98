"""Load a checkpoint of the project's own ViT (`model_export.vit`) as an `ExportSource`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vit_artifact.metadata import Preprocessing, Source, sha256_file

from .sources import CheckpointError, ExportSource, UnsupportedModelError, read_labels
from .vit import VisionTransformer, ViTConfig

CHECKPOINT_FORMAT = "vitserve-vit"


class WithAttention(nn.Module):
    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_with_attention(pixel_values)

    def forward_blocks(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.model.forward_blocks(pixel_values)


def load_own(checkpoint: str | Path, *, labels_file: str | None = None) -> ExportSource:
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with `python -m model_export train-default`"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); is it truncated?") from e
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise UnsupportedModelError(
            f"{path} is not a vitserve ViT checkpoint (no format tag {CHECKPOINT_FORMAT!r}); for Hugging Face or "
            "timm models use `python -m model_export hf` or `python -m model_export timm`"
        )
    config = ViTConfig(**data["config"])
    model = VisionTransformer(config)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} weights do not match its config: {e}") from e
    model.eval()
    labels = read_labels(labels_file, config.num_classes) if labels_file else list(data["labels"])
    if len(labels) != config.num_classes:
        raise CheckpointError(f"checkpoint {path} has {len(labels)} labels for {config.num_classes} classes")
    return ExportSource(
        model=WithAttention(model),
        labels=labels,
        input_size=(config.image_size, config.image_size),
        patch_size=config.patch_size,
        num_layers=config.depth,
        num_heads=config.heads,
        num_prefix_tokens=1,
        preprocessing=Preprocessing.model_validate(data["preprocessing"]),
        source=Source(
            framework="vitserve",
            model="model_export.vit.VisionTransformer",
            checkpoint=path.name,
            checkpoint_sha256=sha256_file(path),
        ),
    )
