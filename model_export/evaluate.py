"""Score a digits artifact on the held-out canvases the way the service runs it (no torch).

Each canvas is encoded as a PNG and handed to the service's own per-request step (`service.core.pipeline.prepare`:
`decode_image`, then the artifact's preprocessing record), run through onnxruntime, and the attention graph's
rollout is checked against the box each digit was placed in (the pointing game).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vit_artifact.attention import rollout
from vit_artifact.metadata import ATTENTIONS, LOGITS, ArtifactMetadata, read_metadata

from . import digits
from .verify import run_in_batches, session


@dataclass(frozen=True)
class DigitsScore:
    accuracy: float
    pointing_game: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "pointing_game": self.pointing_game, "held_out_images": self.n}


def held_out_inputs(meta: ArtifactMetadata) -> tuple[np.ndarray, digits.Canvases]:
    """The held-out canvases as PNG uploads, decoded and preprocessed by the service's code for this artifact."""
    from service.core.pipeline import prepare
    from service.settings import Settings

    max_pixels = Settings.model_fields["max_pixels"].default
    held = digits.held_out_set()
    x = np.stack([prepare(png(c), meta, max_pixels=max_pixels).pixels for c in held.images])
    return x, held


def png(canvas: np.ndarray) -> bytes:
    """A (H, W) uint8 canvas as the PNG file a client would upload (grey: the service makes it RGB)."""
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


def score_digits(directory: Path, *, graph: str = "attention") -> DigitsScore:
    meta = read_metadata(directory)
    x, held = held_out_inputs(meta)
    sess = session(directory / meta.graphs[graph].file)  # type: ignore[index]
    logits, attentions = run_in_batches(sess, x, [LOGITS, ATTENTIONS], batch=64)
    maps = np.stack(
        [rollout(a, num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid) for a in attentions]
    )  # (N, gh, gw)
    accuracy = float(np.mean(logits.argmax(1) == held.labels))
    pointing = float(np.mean(digits.pointing_hits(maps, held.boxes, meta.input_size[0])))
    return DigitsScore(accuracy=accuracy, pointing_game=pointing, n=len(x))


def classify_accuracy(graph: Path, x: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of one classify graph on preprocessed inputs (the path `/v1/classify` serves), one image per run
    as the service runs a dynamic-INT8 graph (its activation scales depend on the batch; FP32's do not)."""
    (logits,) = run_in_batches(session(graph), x, [LOGITS], batch=1)
    return float(np.mean(logits.argmax(1) == labels))
