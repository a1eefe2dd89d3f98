"""What the serving benchmarks serve and send: model repositories, ViT-B/16 exports, and upload images.

    PYTHONPATH=. python benchmarks/artifacts.py      # build (or find) the cached ViT-B/16 exports and print where

ViT-B/16 is Hugging Face's `ViTForImageClassification(ViTConfig(num_labels=1000))` with random weights (seed 0),
saved with `save_pretrained` and exported FP32 and INT8 by the real CLI (`python -m model_export hf ... --int8`).
The exports take minutes, so they are cached under ~/.cache/vitserve/bench-artifacts/<hash>, keyed by the
model_export and service/artifact sources: a change to the exporter rebuilds them, a rerun finds them.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CACHE = Path.home() / ".cache" / "vitserve"
VIT_B16 = "vit-b16"
_EXPORT_SOURCES = [*sorted((ROOT / "model_export").glob("*.py")), *sorted((ROOT / "vit_artifact").glob("*.py"))]


@dataclass(frozen=True)
class Repository:
    """A model directory to serve (one sub-directory per artifact) and the names of its FP32/INT8 models."""

    directory: Path
    fp32: str
    int8: str
    hf_checkpoint: Path | None = None  # the save_pretrained directory the exports came from


def default_repository() -> Repository:
    return Repository(MODELS, "digits-vit", "digits-vit-int8")


def export_key() -> str:
    digest = hashlib.sha256()
    for path in _EXPORT_SOURCES:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def vit_b16_repository(log: Callable[[str], object] = print) -> Repository:
    """The cached ViT-B/16 FP32 + INT8 artifacts; exported through the CLI on the first run."""
    base = CACHE / "bench-artifacts" / export_key()
    models = base / "models"
    checkpoint = base / "hf-vit-b16"
    repo = Repository(models, VIT_B16, f"{VIT_B16}-int8", checkpoint)
    if (models / repo.fp32 / "artifact.json").is_file() and (models / repo.int8 / "artifact.json").is_file():
        return repo
    log(f"exporting ViT-B/16 (random init) FP32 + INT8 into {base} (first run only: a few minutes)")
    if base.exists():
        shutil.rmtree(base)  # a half-written earlier attempt
    base.mkdir(parents=True)
    _save_hf_vit_b16(checkpoint)
    subprocess.run(
        [sys.executable, "-m", "model_export", "hf", str(checkpoint), "--out", str(models / repo.fp32), "--int8"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return repo


def _save_hf_vit_b16(directory: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_labels=1000)).eval()  # type: ignore[call-arg]  # ViT-B/16, 224x224
    model.save_pretrained(directory)
    ViTImageProcessor().save_pretrained(directory)


def photos() -> dict[str, Image.Image]:
    """Real RGB photos shipped inside scikit-image's wheel."""
    import skimage.data

    return {
        name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
    }


def jpeg(image: Image.Image, *, longest_side: int = 640, quality: int = 90) -> bytes:
    """A camera-like JPEG upload: the photo scaled so its longest side is `longest_side`."""
    scale = longest_side / max(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_uploads() -> list[bytes]:
    """JPEG uploads of the sample photos, about 640 pixels on the long side (40-90 kB each)."""
    return [jpeg(image) for image in photos().values()]


def digit_uploads(count: int = 64) -> list[bytes]:
    """Held-out canvases of the default model (digits never seen in training), as PNG uploads."""
    from model_export.digits import held_out_set

    uploads = []
    for canvas in held_out_set().images[:count]:  # (32, 32) uint8
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format="PNG")
        uploads.append(buffer.getvalue())
    return uploads


if __name__ == "__main__":
    r = vit_b16_repository()
    print(f"ViT-B/16 repository: {r.directory} ({r.fp32}, {r.int8}); checkpoint {r.hf_checkpoint}")
