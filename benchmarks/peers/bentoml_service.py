"""BentoML serving a vitserve ONNX artifact with its adaptive batching: the peer with a real batcher.

    PEER_ARTIFACT=models/digits-vit bentoml serve bentoml_service:Classifier --working-dir benchmarks/peers

Runs in its own virtual environment (benchmarks/servers.py makes it), so it imports nothing from vitserve: the
preprocessing numbers are read from the artifact's `artifact.json`, and the math is the usual PIL + numpy
(resize, centre crop, rescale, normalise). One worker process, onnxruntime with its default threads, as
vitserve runs. Clients POST one image per request as multipart field `images`; BentoML's dispatcher merges
concurrent requests into one call of `classify` (up to `PEER_MAX_BATCH_SIZE`, within `PEER_MAX_LATENCY_MS`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image

ARTIFACT = Path(os.environ["PEER_ARTIFACT"])
SPEC = json.loads((ARTIFACT / "artifact.json").read_text())
PREP = SPEC["preprocessing"]
MEAN = np.array(PREP["mean"], np.float32).reshape(3, 1, 1)
STD = np.array(PREP["std"], np.float32).reshape(3, 1, 1)
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[PREP["interpolation"]]


def preprocess(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    height, width = PREP["resize_size"]
    if PREP["resize"] == "shortest_edge":
        scale = height / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), RESAMPLE)
    else:
        image = image.resize((width, height), RESAMPLE)
    crop_h, crop_w = PREP["crop_size"]
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    array = np.asarray(image, np.float32).transpose(2, 0, 1) * PREP["rescale_factor"]
    return (array - MEAN) / STD  # (3, H, W)


def top5(logits: np.ndarray, labels: list[str]) -> list[dict]:
    e = np.exp(logits - logits.max())
    probs = e / e.sum()
    order = np.argsort(-probs)[:5]
    return [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in order]


@bentoml.service(workers=1, traffic={"timeout": 120})
class Classifier:
    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph = ARTIFACT / SPEC["graphs"]["classify"]["file"]
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.labels: list[str] = SPEC["labels"]

    @bentoml.api(
        batchable=True,
        max_batch_size=int(os.environ.get("PEER_MAX_BATCH_SIZE", "16")),
        max_latency_ms=int(os.environ.get("PEER_MAX_LATENCY_MS", "60000")),
    )
    def classify(self, images: list[Image.Image]) -> list[list[dict]]:
        batch = np.stack([preprocess(image) for image in images])  # (B, 3, H, W)
        (logits,) = self.session.run(None, {self.input: batch})
        return [top5(row, self.labels) for row in logits]
