"""Small random-init Hugging Face and timm checkpoints saved locally (never downloaded), and their exports.

Random heads give near-uniform probabilities, which would make any probability comparison pass; the heads
are scaled up so predictions are peaked and a wrong pixel or a wrong normalisation shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.conftest import run_cli

HF_KWARGS = dict(
    image_size=64,
    patch_size=16,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    num_labels=5,
)
TIMM_KWARGS = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)
LABELS = ["apple", "bird", "car", "dog", "elm"]


@dataclass
class Exported:
    source: Path  # the checkpoint directory or file
    artifact: Path  # the exported artifact directory


def _sharpen(head: torch.nn.Linear) -> None:
    with torch.no_grad():
        head.weight.mul_(40.0)


def save_hf_vit(directory: Path, *, deit: bool = False) -> Path:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

    torch.manual_seed(1)
    id2label = dict(enumerate(LABELS))
    if deit:
        model = DeiTForImageClassificationWithTeacher(DeiTConfig(**HF_KWARGS, id2label=id2label))
        _sharpen(model.cls_classifier)
        _sharpen(model.distillation_classifier)
        from transformers import DeiTImageProcessorPil as Processor  # type: ignore[attr-defined]

        processor = Processor(size={"height": 72, "width": 72}, crop_size={"height": 64, "width": 64})
    else:
        model = ViTForImageClassification(ViTConfig(**HF_KWARGS, id2label=id2label))
        _sharpen(model.classifier)
        from transformers import ViTImageProcessorPil as Processor  # type: ignore[attr-defined]

        processor = Processor(size={"height": 64, "width": 64})
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_timm_vit(path: Path, name: str = "vit_tiny_patch16_224") -> Path:
    import timm

    torch.manual_seed(2)
    model = timm.create_model(name, pretrained=False, num_classes=len(LABELS), **TIMM_KWARGS)
    _sharpen(model.head)
    if getattr(model, "head_dist", None) is not None:
        _sharpen(model.head_dist)
    torch.save(model.state_dict(), path)
    return path


def timm_model_args() -> list[str]:
    return [arg for k, v in TIMM_KWARGS.items() for arg in ("--model-arg", f"{k}={json.dumps(v)}")]


def export(*args: str) -> None:
    result = run_cli("-m", "model_export", *args)
    assert result.returncode == 0, result.stderr


def build_framework_models(root: Path) -> dict[str, Exported]:
    """hf-vit, hf-deit, timm-vit, timm-deit: saved sources and their artifacts under root/models."""
    sources, models = root / "sources", root / "models"
    sources.mkdir()
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out: dict[str, Exported] = {}
    for name, deit in [("hf-vit", False), ("hf-deit", True)]:
        src = save_hf_vit(sources / name, deit=deit)
        export("hf", str(src), "--out", str(models / name))
        out[name] = Exported(src, models / name)
    for name, arch in [("timm-vit", "vit_tiny_patch16_224"), ("timm-deit", "deit_tiny_distilled_patch16_224")]:
        src = save_timm_vit(sources / f"{name}.pth", arch)
        export(
            "timm",
            arch,
            "--checkpoint",
            str(src),
            "--labels",
            str(labels),
            *timm_model_args(),
            "--out",
            str(models / name),
        )
        out[name] = Exported(src, models / name)
    return out
