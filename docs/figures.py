"""Regenerate the README's pictures from the committed default model, through the service's own routes.

    PYTHONPATH=. python docs/figures.py
"""

from __future__ import annotations

import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from model_export.digits import held_out_set
from service.app import create_app

IMAGES = Path(__file__).parent / "images"


def png_bytes(array) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    held = held_out_set()
    with TestClient(create_app()) as client:
        for i, name in [(3, "digit-rollout"), (11, "digit-rollout-2")]:
            data = png_bytes(held.images[i])
            r = client.post("/v1/attention?format=png", content=data, headers={"content-type": "image/png"})
            r.raise_for_status()
            (IMAGES / f"{name}.png").write_bytes(r.content)
            print(f"{name}.png: label {held.labels[i]}, box {held.boxes[i].tolist()}")
        data = png_bytes(held.images[3])
        r = client.post("/v1/attention?method=layer&layer=0&head=1&format=png", content=data,
                        headers={"content-type": "image/png"})
        r.raise_for_status()
        (IMAGES / "digit-layer0-head1.png").write_bytes(r.content)


if __name__ == "__main__":
    main()
