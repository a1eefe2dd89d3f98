"""The peer most tutorials deploy: FastAPI + PyTorch eager, one image per request, under uvicorn.

    PEER_SOURCE=hf PEER_HF_CHECKPOINT=DIR PEER_ARTIFACT=DIR uvicorn benchmarks.peers.torch_eager_app:app
    PEER_SOURCE=digits PEER_ARTIFACT=models/digits-vit uvicorn benchmarks.peers.torch_eager_app:app

`hf`: `ViTForImageClassification.from_pretrained` of the checkpoint the benchmark's ViT-B/16 artifacts were
exported from (the same weights). `digits`: the project's own ViT with the default model's config
(`model_export.train.DIGITS_CONFIG`) and random weights: speed, not accuracy, is compared. Preprocessing is
PIL + numpy (resize, centre crop, rescale, normalise) with the numbers read from the artifact's record, and
the model runs inline under `torch.no_grad()`, as the usual `async def predict(file: UploadFile)` does.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

SOURCE = os.environ.get("PEER_SOURCE", "digits")
ARTIFACT = Path(os.environ["PEER_ARTIFACT"])
spec = json.loads((ARTIFACT / "artifact.json").read_text())
labels: list[str] = spec["labels"]
prep = spec["preprocessing"]

if SOURCE == "hf":
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(os.environ["PEER_HF_CHECKPOINT"]).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).logits

else:
    from model_export.train import DIGITS_CONFIG
    from model_export.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(DIGITS_CONFIG).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)


MEAN = np.array(prep["mean"], np.float32).reshape(3, 1, 1)
STD = np.array(prep["std"], np.float32).reshape(3, 1, 1)
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[prep["interpolation"]]


def preprocess(image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    height, width = prep["resize_size"]
    if prep["resize"] == "shortest_edge":
        scale = height / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), RESAMPLE)
    else:
        image = image.resize((width, height), RESAMPLE)
    crop_h, crop_w = prep["crop_size"]
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    array = np.asarray(image, np.float32).transpose(2, 0, 1) * prep["rescale_factor"]
    return torch.from_numpy((array - MEAN) / STD).unsqueeze(0)  # (1, 3, H, W)


app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/predict")
async def predict(file: Annotated[UploadFile, File()]) -> dict:
    image = Image.open(io.BytesIO(await file.read()))
    x = preprocess(image)
    with torch.no_grad():
        probs = torch.softmax(forward(x)[0], dim=-1)
    top = torch.topk(probs, k=min(5, len(labels)))
    return {
        "predictions": [
            {"label": labels[i], "index": int(i), "probability": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
    }
