"""Calibration images for static INT8: a directory the user gives, or the default model's training canvases.

Static quantization fixes each activation's scale from what these images make the model compute, so they
should look like what the model will serve. They go through the artifact's own preprocessing record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vit_artifact.metadata import Calibration, Preprocessing
from vit_artifact.preprocessing import preprocess_batch

from . import digits
from .sources import ExportError
from .variants import CalibrationSet

MAX_IMAGES = 512  # histogram calibration (percentile, entropy) costs time per image; 512 settle the ranges
CANVAS_SEED = 777  # placements no training epoch drew (those use seed * 1000 + epoch)


def calibration_from_dir(directory: Path, spec: Preprocessing, method: Calibration) -> CalibrationSet:
    """Every image file in `directory` (sorted by name, at most MAX_IMAGES), preprocessed as the artifact says."""
    if not directory.is_dir():
        raise ExportError(f"--calibration {directory}: not a directory; give a folder of images like those served")
    images = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            continue  # not an image: calibration folders often hold a README or labels file
        if len(images) == MAX_IMAGES:
            break
    if not images:
        raise ExportError(f"--calibration {directory}: no readable images in it")
    return CalibrationSet(
        inputs=preprocess_batch(images, spec), source=f"{len(images)} images from {directory.name}/", method=method
    )


def training_calibration(spec: Preprocessing, method: Calibration = "minmax") -> CalibrationSet:
    """One fresh placement of training digits (never held-out ones) on canvases, as the digits models see."""
    images, labels = digits.load_sources()
    train_idx, _ = digits.split_sources(len(images))
    pick = np.random.default_rng(CANVAS_SEED).choice(train_idx, MAX_IMAGES, replace=False)
    canvases = digits.make_canvases(images, labels, np.sort(pick), copies=1, seed=CANVAS_SEED)
    rgb = [Image.fromarray(c).convert("RGB") for c in canvases.images]
    return CalibrationSet(
        inputs=preprocess_batch(rgb, spec), source=f"{len(rgb)} training canvases of the digits set", method=method
    )
