"""What the fuzzers call, what they start from, and what counts as a crash.

Two targets, each a function of one byte string, shared by the atheris harness (tests/fuzz/harness.py) and the
hypothesis property tests (tests/service/test_fuzz_decode.py):

- `check_image`: untrusted bytes -> `service.core.imaging.decode_image` -> `vit_artifact.preprocessing.preprocess` with the
  default model's real `Preprocessing` record: the serving path of every image route.
- `check_v2`: an Open Inference Protocol request body (and `Inference-Header-Content-Length`) ->
  `service.v2.codec.parse_request` -> `decode_input` for every input.

A `ServiceError` (400, 413, 415: a client error with a message) is the expected answer to bad bytes; any other
exception is a crash, and so is a result that breaks the contract (a model input of the wrong shape, dtype or
with non-finite values).
"""

from __future__ import annotations

import base64
import io
import json
import struct
from functools import cache

import numpy as np
from PIL import ExifTags, Image

from service.core.imaging import decode_image
from service.errors import ServiceError
from service.v2.codec import decode_input, parse_request
from tests.conftest import DEFAULT_MODEL
from vit_artifact.metadata import Preprocessing, read_metadata
from vit_artifact.preprocessing import preprocess

# Small enough that every accepted image decodes in milliseconds, so a slow input is a real hang, not a big
# image; large enough for the seeds (the service default is 40 megapixels; the code path is the same).
MAX_PIXELS = 1_000_000
HEADER_LENGTH_ABSENT = 0xFFFF  # `check_v2` framing: this value means "no Inference-Header-Content-Length"


@cache
def preprocessing() -> Preprocessing:
    return read_metadata(DEFAULT_MODEL, verify_hashes=False).preprocessing


def check_image(data: bytes) -> None:
    spec = preprocessing()
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS, target_size=spec.resize_size)
    except ServiceError:
        return
    assert image.mode == "RGB" and image.width * image.height <= MAX_PIXELS, (image.mode, image.size)
    pixels = preprocess(image, spec)
    assert pixels.shape == (3, *spec.crop_size) and pixels.dtype == np.float32, (pixels.shape, pixels.dtype)
    assert np.isfinite(pixels).all()


def frame_v2(body: bytes, header_length: int | None = None) -> bytes:
    """A fuzz input for `check_v2`: two bytes of header length (or HEADER_LENGTH_ABSENT), then the body."""
    return struct.pack("<H", HEADER_LENGTH_ABSENT if header_length is None else header_length) + body


def check_v2(data: bytes) -> None:
    if len(data) < 2:
        return
    (length,) = struct.unpack_from("<H", data)
    body = data[2:]
    try:
        request, binary = parse_request(body, None if length == HEADER_LENGTH_ABSENT else str(length))
        offset = 0
        for tensor in request.inputs:
            values, offset = decode_input(tensor, binary, offset)
            if isinstance(values, list):  # BYTES
                assert all(isinstance(v, bytes) for v in values)
            else:
                assert list(values.shape) == tensor.shape, (values.shape, tensor.shape)
    except ServiceError:
        return


# --- seed corpora: small valid inputs of every kind the service accepts ---------------------------------------


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def seed_images() -> dict[str, bytes]:
    """One small file per accepted format and colour mode (the corpus the image fuzzer mutates)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    palette = grey.convert("P")
    palette.info["transparency"] = 0
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (12, 9), dtype=np.uint8)))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "png-rgb": _encode(rgb, "PNG"),
        "png-grey": _encode(grey, "PNG"),
        "png-palette-transparency": _encode(palette, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-16-bit": _encode(Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257), "PNG"),
        "png-1-bit": _encode(grey.convert("1"), "PNG"),
        "png-exif": _encode(rgb, "PNG", exif=exif.tobytes()),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg-grey": _encode(grey, "JPEG"),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-exif-rotated": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg-progressive": _encode(rgb, "JPEG", progressive=True),
        "webp-lossy": _encode(rgb, "WEBP", quality=50),
        "webp-lossless-alpha": _encode(rgba, "WEBP", lossless=True),
        "webp-animated": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "bmp": _encode(rgb, "BMP"),
        "bmp-palette": _encode(palette, "BMP"),
        "gif": _encode(grey, "GIF"),
        "gif-animated-transparency": _encode(palette, "GIF", save_all=True, append_images=[grey.convert("P")]),
        "tiff": _encode(rgb, "TIFF"),
        "tiff-deflate-grey": _encode(grey, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-float": _encode(Image.fromarray(np.asarray(grey, dtype=np.float32) / 255), "TIFF"),
        "tiff-multipage": _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
    }


def seed_v2() -> dict[str, bytes]:
    """Framed V2 request bodies: JSON and binary, pixels and encoded images, outputs and parameters."""
    spec = preprocessing()
    height, width = spec.crop_size
    png = seed_images()["png-rgb"]
    pixels = np.zeros((1, 3, height, width), np.float32)

    def request(inputs: list[dict], **extra: object) -> bytes:
        return json.dumps({"id": "seed", "inputs": inputs, **extra}).encode()

    def binary(tensor: dict, raw: bytes) -> bytes:
        header = request([{**tensor, "parameters": {"binary_data_size": len(raw)}}])
        return frame_v2(header + raw, len(header))

    image_tensor = {"name": "image", "shape": [1], "datatype": "BYTES"}
    pixel_tensor = {"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32"}
    return {
        "json-image": frame_v2(request([{**image_tensor, "data": [base64.b64encode(png).decode()]}])),
        "json-pixels": frame_v2(request([{**pixel_tensor, "data": pixels.reshape(-1).tolist()}])),
        "json-nested-uint8": frame_v2(
            request([{"name": "x", "shape": [2, 2], "datatype": "UINT8", "data": [[1, 2], [3, 4]]}])
        ),
        "json-outputs": frame_v2(
            request(
                [{**image_tensor, "data": [base64.b64encode(png).decode()]}],
                outputs=[{"name": "logits", "parameters": {"classification": 3}}, {"name": "attention_rollout"}],
                parameters={"binary_data_output": True},
            )
        ),
        "binary-image": binary(image_tensor, struct.pack("<I", len(png)) + png),
        "binary-pixels": binary(pixel_tensor, pixels.tobytes()),
    }
