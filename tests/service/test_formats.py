"""Every accepted file format and colour mode, sent to a running server.

A held-out digit canvas the model is sure of is re-encoded in each format and mode. Lossless encodings must
give exactly the probabilities of the plain RGB PNG (the decoder hands the model the same pixels); lossy ones
must give the same digit. Transparency, EXIF rotation and animated files are checked against what the
decoder promises: composited on white, shown upright, first frame only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image

from tests.service.conftest import (
    assert_same_probabilities,
    canvas_image,
    classify,
    encode,
    post_image,
    top_label,
)


@pytest.fixture(scope="module")
def confident(client, held_out, held_out_pngs) -> dict[str, Any]:
    """The held-out canvas (of the sample) classified correctly with the highest probability."""
    bodies = [classify(client, png) for png in held_out_pngs]
    correct = [i for i, body in enumerate(bodies) if top_label(body) == str(held_out.labels[i])]
    best = max(correct, key=lambda i: bodies[i]["predictions"][0]["probability"])
    assert bodies[best]["predictions"][0]["probability"] > 0.8
    return {"canvas": held_out.images[best], "label": str(held_out.labels[best]), "body": bodies[best]}


def grey(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas)  # mode L


def palette_with_transparency(canvas: np.ndarray) -> Image.Image:
    image = grey(canvas).convert("P")  # a grey palette: index v holds (v, v, v)
    image.info["transparency"] = 0  # the darkest background pixels become see-through
    return image


def sixteen_bit(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas.astype(np.uint16) * 257)  # 0..255 -> 0..65535, mode I;16


TRANSPARENT_ROWS = 3


def with_alpha(canvas: np.ndarray) -> Image.Image:
    image = canvas_image(canvas).convert("RGBA")
    alpha = np.full(canvas.shape, 255, np.uint8)
    alpha[:TRANSPARENT_ROWS, :] = 0
    image.putalpha(Image.fromarray(alpha))
    return image


def on_white(canvas: np.ndarray, transparent: np.ndarray) -> Image.Image:
    """What the decoder must make of a transparent image: see-through pixels composited on white."""
    return canvas_image(np.where(transparent, 255, canvas).astype(np.uint8))


# (name, bytes of the canvas, the RGB image the server must decode from them)
Case = tuple[str, Callable[[np.ndarray], bytes], Callable[[np.ndarray], Image.Image]]
LOSSLESS: list[Case] = [
    ("png-rgb", lambda c: encode(canvas_image(c), "PNG"), canvas_image),
    ("png-grey-L", lambda c: encode(grey(c), "PNG"), canvas_image),
    ("png-16-bit", lambda c: encode(sixteen_bit(c), "PNG"), canvas_image),
    ("png-palette-transparency", lambda c: encode(palette_with_transparency(c), "PNG"), lambda c: on_white(c, c == 0)),
    (
        "png-rgba",
        lambda c: encode(with_alpha(c), "PNG"),
        lambda c: on_white(c, np.arange(len(c))[:, None] < TRANSPARENT_ROWS),
    ),
    ("webp-lossless", lambda c: encode(canvas_image(c), "WEBP", lossless=True), canvas_image),
    ("bmp", lambda c: encode(canvas_image(c), "BMP"), canvas_image),
    ("bmp-grey-L", lambda c: encode(grey(c), "BMP"), canvas_image),
    ("gif", lambda c: encode(grey(c), "GIF"), canvas_image),
    ("gif-palette-transparency", lambda c: encode(palette_with_transparency(c), "GIF"), lambda c: on_white(c, c == 0)),
    ("tiff", lambda c: encode(canvas_image(c), "TIFF"), canvas_image),
    ("tiff-deflate-L", lambda c: encode(grey(c), "TIFF", compression="tiff_adobe_deflate"), canvas_image),
]
LOSSY: list[tuple[str, Callable[[np.ndarray], bytes]]] = [
    ("jpeg", lambda c: encode(canvas_image(c, scale=4), "JPEG", quality=95)),
    ("jpeg-grey-L", lambda c: encode(grey(c).resize((128, 128), Image.Resampling.NEAREST), "JPEG", quality=95)),
    ("jpeg-cmyk", lambda c: encode(canvas_image(c, scale=4).convert("CMYK"), "JPEG", quality=95)),
    ("webp-lossy", lambda c: encode(canvas_image(c, scale=4), "WEBP", quality=95)),
]


@pytest.mark.parametrize(("name", "make", "expected"), LOSSLESS, ids=[c[0] for c in LOSSLESS])
def test_lossless_formats_and_modes_give_the_decoded_images_probabilities(client, confident, name, make, expected):
    canvas = confident["canvas"]
    body = classify(client, make(canvas))
    assert_same_probabilities(body, classify(client, encode(expected(canvas))))
    assert top_label(body) == confident["label"]


def test_transparency_is_composited_on_white_not_ignored(client, confident):
    # The lossless cases above would pass for a decoder that drops alpha, if alpha changed nothing: it does.
    canvas = confident["canvas"]
    keeps = classify(client, encode(canvas_image(canvas)))
    composited = classify(client, encode(with_alpha(canvas)))
    assert (
        max(
            abs(a["probability"] - b["probability"])
            for a, b in zip(keeps["predictions"], composited["predictions"], strict=True)
        )
        > 1e-6
    )


@pytest.mark.parametrize(("name", "make"), LOSSY, ids=[c[0] for c in LOSSY])
def test_lossy_formats_give_the_same_digit(client, confident, name, make):
    assert top_label(classify(client, make(confident["canvas"]))) == confident["label"]


def test_declared_content_type_does_not_matter(client, confident):
    # The format is read from the bytes: a PNG labelled image/jpeg is still a PNG.
    png = encode(canvas_image(confident["canvas"]))
    response = post_image(client, "/v1/classify", png, content_type="image/jpeg", params={"top_k": 10})
    assert response.status_code == 200, response.text
    assert_same_probabilities(response.json(), confident["body"])


def test_animated_gif_is_classified_by_its_first_frame(client, held_out, confident):
    first = confident["canvas"]
    other = next(
        c for c, label in zip(held_out.images, held_out.labels, strict=True) if str(label) != confident["label"]
    )
    animated = encode(grey(first), "GIF", save_all=True, append_images=[grey(other)], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(animated)), "n_frames", 1) == 2
    body = classify(client, animated)
    assert_same_probabilities(body, confident["body"])
    assert top_label(classify(client, encode(grey(other), "GIF"))) != confident["label"]


def exif_rotated_jpeg(upright: Image.Image, orientation: int, transpose: Image.Transpose) -> bytes:
    """The upright image stored turned by `transpose`, with the EXIF orientation that turns it back."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(upright.transpose(transpose), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "stored"),
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)],
    ids=["rotate-90", "rotate-270", "rotate-180"],
)
def test_exif_rotated_jpeg_is_classified_upright(client, held_out, orientation, stored):
    # A canvas whose digit the model reads correctly upright and differently when turned, so that a server
    # ignoring the EXIF orientation would fail here.
    for canvas, label in zip(held_out.images, held_out.labels, strict=True):
        upright = canvas_image(canvas, scale=4)
        plain_upright = classify(client, encode(upright, "JPEG", quality=95))
        turned = classify(client, encode(upright.transpose(stored), "JPEG", quality=95))
        if top_label(plain_upright) == str(label) and top_label(turned) != str(label):
            break
    else:
        pytest.fail("no held-out canvas changes its prediction when turned")
    rotated = classify(client, exif_rotated_jpeg(upright, orientation, stored))
    assert top_label(rotated) == top_label(plain_upright)
    assert rotated["predictions"][0]["probability"] == pytest.approx(
        plain_upright["predictions"][0]["probability"], abs=0.05
    )


def test_large_jpeg_is_decoded_reduced_and_classified(client, confident):
    # 3000x2000: the 2000x2000 centre holds the canvas, which is what the centre crop keeps.
    large = Image.new("RGB", (3000, 2000))
    large.paste(canvas_image(confident["canvas"]).resize((2000, 2000), Image.Resampling.BILINEAR), (500, 0))
    data = encode(large, "JPEG", quality=90)
    response = post_image(client, "/v1/classify", data, content_type="image/jpeg")
    assert response.status_code == 200, response.text
    assert top_label(response.json()) == confident["label"]
