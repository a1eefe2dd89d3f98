"""The preprocessing math: one implementation of `artifact.Preprocessing`, used by export and service alike.

Pillow and numpy only, so serving needs no torch. Each step reproduces its source framework's arithmetic
(tests/vit_artifact/test_preprocessing.py checks it against transformers and timm on photos):

- "squash" is Hugging Face's ViT/DeiT image processors: resize to (height, width) exactly, then centre-crop.
- "shortest_edge" is torchvision's `Resize(int)`, which timm's eval transform uses (and transformers'
  processors with a `shortest_edge` size): the long side becomes int(size * long / short); a crop larger than
  the image is padded with zeros.
- The centre crop's offset follows the record's `crop_offset`: "floor" is transformers' floor((size - crop) / 2),
  "round" is torchvision's `CenterCrop`, int(round((size - crop) / 2)) (halves to even, so the two differ by a
  pixel where size - crop is 3 mod 4). Older records without the field get the rule their resize mode implied.

Resampling uses Pillow's filters, which is what both frameworks run on a PIL image.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vit_artifact.metadata import CropOffset, Interpolation, Preprocessing

RESAMPLING: dict[Interpolation, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

Box = tuple[int, int, int, int]

# Resize the whole image (exact parity) while the resized image has at most this many times the crop's pixels,
# i.e. up to an aspect ratio of about 12:1 for timm's usual 248 -> 224; beyond, resample only the crop window.
_EXACT_RESIZE_LIMIT = 16


def preprocess(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image -> float32 model input (3, H, W)."""
    return to_tensor(resize_and_crop(image, spec), spec)


def preprocess_batch(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """RGB images -> float32 model input (N, 3, H, W)."""
    height, width = spec.crop_size
    batch = np.empty((len(images), 3, height, width), dtype=np.float32)
    for row, image in zip(batch, images, strict=True):
        to_tensor(resize_and_crop(image, spec), spec, out=row)
    return batch


def resize_and_crop(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """Resize and centre-crop to `spec.crop_size`: pixel for pixel what the source framework makes."""
    _require_rgb(image)
    resized = resized_size(image.size, spec)
    window = _crop_window(resized, spec)
    resample = RESAMPLING[spec.interpolation]
    if resized[0] * resized[1] <= _EXACT_RESIZE_LIMIT * spec.crop_size[0] * spec.crop_size[1]:
        # Image.crop fills what lies outside the image with black, as torchvision pads.
        return image.resize(resized, resample).crop(window)
    return _resize_window(image, resized, window, resample)


def _resize_window(
    image: Image.Image, resized: tuple[int, int], window: Box, resample: Image.Resampling
) -> Image.Image:
    """Resample only the part of the image the crop keeps (Pillow's `box`), for extreme aspect ratios.

    Under "shortest_edge" a 1x40000 image would otherwise become a 224x8960000 intermediate. The filters are
    the same, but Pillow passes the box as C floats, so sample positions move by ~1e-5 pixel and values can
    differ from the framework's by a few units in 255 (a pixel's shift for "nearest").
    """
    inside = _intersect(window, resized)
    part = image.resize(
        (inside[2] - inside[0], inside[3] - inside[1]),
        resample,
        box=_to_source(inside, resized, image.size),
    )
    if inside == window:
        return part
    canvas = Image.new("RGB", (window[2] - window[0], window[3] - window[1]))  # black, as torchvision pads
    canvas.paste(part, (inside[0] - window[0], inside[1] - window[1]))
    return canvas


def to_tensor(image: Image.Image, spec: Preprocessing, *, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB image -> float32 (3, H, W): rescale, subtract mean, divide by std, then order channels.

    mean and std are per R, G, B channel; for a BGR model the channels are reversed after normalising. Written
    into `out` (a C-contiguous float32 (3, H, W) array, e.g. a row of a batch) when given.

    A uint8 value has 256 possible results per channel, so the arithmetic runs once per value (`_value_table`)
    and the image is one table lookup per channel, straight into the channels-first output: one pass over the
    pixels instead of five (float64 copy, float32 copy, subtract, divide, transpose), bit for bit the same.
    """
    _require_rgb(image)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    if out is None:
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    table = _value_table(spec.rescale_factor, tuple(spec.mean), tuple(spec.std))
    channels = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
    for plane, channel in zip(out, channels, strict=True):
        # mode="clip" skips the bounds check: a uint8 index is always inside the 256-entry table.
        np.take(table[channel], pixels[..., channel], out=plane, mode="clip")
    return out


@functools.lru_cache(maxsize=64)
def _value_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the model input value of each uint8 value in each R, G, B channel.

    The framework's arithmetic, element for element: rescale in float64, round once to float32, as transformers
    does (timm's float32 x / 255: within 1 ulp), then subtract the float32 mean and divide by the float32 std.
    """
    values = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    table = (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False  # shared by every call with the same record
    return table


def crop_box(
    image_size: tuple[int, int],
    spec: Preprocessing,
    *,
    original_size: tuple[int, int] | None = None,
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the region of an image of `image_size` (width, height) the model sees.

    In that image's pixel coordinates, or in `original_size` ones when the image is a reduced decode of a
    larger original (see `service.core.imaging.original_size`). Where the crop is padded, the box reaches outside
    the image.
    """
    resized = resized_size(image_size, spec)
    return _to_source(_crop_window(resized, spec), resized, original_size or image_size)


def resized_size(image_size: tuple[int, int], spec: Preprocessing) -> tuple[int, int]:
    """(width, height) after the resize step, before the crop."""
    if spec.resize == "squash":
        return spec.resize_size[1], spec.resize_size[0]
    width, height = image_size
    short, long = (width, height) if width <= height else (height, width)
    # torchvision's arithmetic (`_compute_resized_output_size`): truncate, do not round.
    new_short, new_long = spec.resize_size[0], int(spec.resize_size[0] * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _crop_window(resized: tuple[int, int], spec: Preprocessing) -> Box:
    """The crop in resized-image pixels; it reaches outside the image where the crop is padded."""
    crop_height, crop_width = spec.crop_size
    left = _crop_offset(resized[0], crop_width, spec.crop_offset)
    top = _crop_offset(resized[1], crop_height, spec.crop_offset)
    return left, top, left + crop_width, top + crop_height


def _crop_offset(length: int, crop: int, rule: CropOffset) -> int:
    if crop > length:
        return -((crop - length) // 2)  # torchvision pads (crop - length) // 2 before, the rest after
    if rule == "floor":
        return (length - crop) // 2  # transformers' center_crop
    return round((length - crop) / 2.0)  # torchvision's CenterCrop: int(round(...))


def _intersect(window: Box, resized: tuple[int, int]) -> Box:
    left, top, right, bottom = window
    return max(left, 0), max(top, 0), min(right, resized[0]), min(bottom, resized[1])


def _to_source(box: Box, resized: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    # Multiply before dividing, so that the far edge maps to exactly the image size (Pillow checks the box).
    return (
        box[0] * size[0] / resized[0],
        box[1] * size[1] / resized[1],
        box[2] * size[0] / resized[0],
        box[3] * size[1] / resized[1],
    )


def _require_rgb(image: Image.Image) -> None:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}; decode it with imaging.decode_image")
