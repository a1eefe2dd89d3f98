"""Write the sample images that README's commands use (in the dev environment: scikit-learn, scikit-image).

    PYTHONPATH=. python samples/make_samples.py

- `digits/<d>.png`, one for each digit d: the first canvas of the default model's held-out set
  (`model_export.digits.held_out_set`: digits that training never saw, at a random place and size among clutter
  strokes) that the committed model, run as the service runs it, calls d. 32x32, the model's input size.
- `cat.jpg`, `coffee.jpg`, `rocket.jpg`: scikit-image's photographs (CC0 or public domain; samples/README.md),
  320 pixels wide. The default model knows only digits: what it answers for them shows that any photo is taken.

Deterministic: the held-out set is fixed by its seed, and the encoders' settings are fixed here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "models" / "digits-vit"
PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}  # file name: scikit-image's name
PHOTO_WIDTH = 320


def png(canvas: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def sample_digits() -> dict[str, bytes]:
    """Label -> PNG of the first held-out canvas of that label the default model gets right."""
    from model_export.digits import held_out_set
    from service.core.pipeline import prepare
    from service.core.runtime import CPU, load_model

    model = load_model(MODEL, providers=[CPU], threads=1, cpu_rewrites=True)
    canvases = held_out_set()
    chosen: dict[str, bytes] = {}
    for canvas, label in zip(canvases.images, canvases.labels, strict=True):
        name = str(label)
        if name in chosen:
            continue
        data = png(canvas)
        logits, _ = model.infer(prepare(data, model.meta, max_pixels=10**6).pixels[None], with_attention=False)
        if model.meta.labels[int(logits[0].argmax())] == name:
            chosen[name] = data
    return dict(sorted(chosen.items()))


def photo(name: str) -> bytes:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    height = round(image.height * PHOTO_WIDTH / image.width)
    buffer = io.BytesIO()
    image.resize((PHOTO_WIDTH, height), Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=85, optimize=True)
    return buffer.getvalue()


def main() -> None:
    (HERE / "digits").mkdir(exist_ok=True)
    for label, data in sample_digits().items():
        (HERE / "digits" / f"{label}.png").write_bytes(data)
    for file, name in PHOTOS.items():
        (HERE / f"{file}.jpg").write_bytes(photo(name))
    print(f"wrote the sample images in {HERE}")


if __name__ == "__main__":
    main()
