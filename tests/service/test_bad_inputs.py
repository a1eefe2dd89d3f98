"""A corpus of hostile and odd inputs over HTTP: what tests/service/test_errors.py and test_formats.py leave out.

Every input gets its documented answer and nothing else: a 4xx with the error body and a message that says
what was wrong (`{"error": {"code", "message", "detail"}}` on /v1, `{"error": "message"}` on /v2), or a 200
where the input is odd but valid (a lying file name, a 1x4000 image, an animated WebP). After each, the next
good request is served; no input ever gets a 5xx, and the server logs no traceback.

- files that are no image, or an image format we refuse, whatever content type or file name they come with;
- odd but valid images: lying names and types, 1x1 and extreme aspect ratios, animated WebP and GIF;
- tiny files whose headers claim huge dimensions (PNG, GIF, BMP, TIFF, JPEG SOF, WebP): 413 from the header,
  fast, without the server's memory moving;
- malformed multipart, more files than the batch limit, NaN / inf / huge / non-ASCII query values, unknown
  models, layers and heads;
- Open Inference Protocol requests with wrong shapes, datatypes, byte counts, negative or overflowing dims, an
  `Inference-Header-Content-Length` beyond the body, BYTES elements whose length prefix lies.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, features

from tests.service.conftest import allocates_no_image, assert_same_probabilities, canvas_image, encode, post_image
from tests.service.test_errors import GOOD_PNG, assert_error, assert_still_serving, blank_png
from tests.service.test_imaging import jpeg_claiming

RAW = "/v1/classify"
BATCH = "/v1/classify/batch"
ATTENTION = "/v1/attention"
MODEL = "digits-vit"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module", autouse=True)
def no_server_faults(server) -> Iterator[None]:
    """After the module: the server logged no traceback (a 500 would have)."""
    yield
    log = server.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log


# --- files that are no image, or an image format we refuse --------------------------------------------------

PDF = b"%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect width="32" height="32"/></svg>'
ZIP = b"PK\x03\x04" + b"\x14\x00" + b"\0" * 24 + b"a.png"
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\0" * 32
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 32
ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 57


def refused(fmt: str, mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, (16, 16), 200 if mode != "RGB" else (200, 30, 30)), fmt)


NOT_IMAGES = [
    pytest.param(PDF, "image/png", id="pdf-as-png"),
    pytest.param(SVG, "image/svg+xml", id="svg"),
    pytest.param(ZIP, "image/png", id="zip"),
    pytest.param(MP4, "image/jpeg", id="mp4"),
    pytest.param(HEIC, "image/heic", id="heic"),
    pytest.param(ELF, "application/octet-stream", id="elf"),
    pytest.param(b"\x89PNG\r\n\x1a\n", "image/png", id="png-signature-only"),
    pytest.param(b"GIF89a", "image/gif", id="gif-signature-only"),
    pytest.param(b"\xff\xd8\xff\xd9", "image/jpeg", id="jpeg-soi-eoi"),
    pytest.param(b"RIFF\x04\x00\x00\x00WEBP", "image/webp", id="webp-riff-only"),
    pytest.param(b"\0", "image/png", id="one-zero-byte"),
]
REFUSED_FORMATS = [
    pytest.param("TGA", "RGB", id="tga"),
    pytest.param("PCX", "RGB", id="pcx"),
    pytest.param("SGI", "RGB", id="sgi"),
    pytest.param("EPS", "RGB", id="eps"),
    pytest.param("QOI", "RGB", id="qoi"),
    pytest.param("DDS", "RGB", id="dds"),
    pytest.param("DIB", "RGB", id="dib"),
    pytest.param("MSP", "1", id="msp"),
    pytest.param("XBM", "1", id="xbm"),
    pytest.param(
        "JPEG2000", "RGB", id="jpeg2000", marks=pytest.mark.skipif(not features.check("jpg_2000"), reason="no openjpeg")
    ),
    pytest.param("AVIF", "RGB", id="avif", marks=pytest.mark.skipif(not features.check("avif"), reason="no libavif")),
]


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
@pytest.mark.parametrize(("data", "content_type"), NOT_IMAGES)
def test_bytes_that_are_no_image_are_400(client, data, content_type, multipart):
    kwargs = (
        {"files": {"file": ("photo.png", data, content_type)}}
        if multipart
        else {"content": data, "headers": {"content-type": content_type}}
    )
    error = assert_error(client.post(RAW, **kwargs), 400, "bad_image")
    assert "JPEG, PNG, WebP, BMP, GIF or TIFF" in error["message"] or "damaged" in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize(("fmt", "mode"), REFUSED_FORMATS)
def test_an_image_format_we_refuse_is_415_and_named(client, fmt, mode):
    # Sent as image/png: the format comes from the bytes, so the lie changes nothing.
    error = assert_error(post_image(client, RAW, refused(fmt, mode)), 415, "unsupported_media_type")
    assert error["detail"]["format"] == fmt and "PNG" in error["message"]
    assert_still_serving(client)


# --- odd but valid images --------------------------------------------------------------------------------


def classified(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert abs(sum(p["probability"] for p in body["predictions"]) - 1) < 1e-6  # top_k=10: every class
    return body


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("x.jpg", "image/jpeg"), ("x.gif", "image/gif"), ("x", "application/octet-stream"), ("x.txt", "text/plain")],
    ids=["named-jpg", "named-gif", "no-extension", "text-plain-part"],
)
def test_a_lying_file_name_or_part_type_changes_nothing(client, name, content_type):
    # Format comes from the bytes, never from the name or the declared type of the part.
    expected = classified(post_image(client, RAW, GOOD_PNG, params={"top_k": 10}))
    response = client.post(RAW, params={"top_k": 10}, files={"file": (name, GOOD_PNG, content_type)})
    assert_same_probabilities(classified(response), expected)


def test_a_jpeg_named_png_and_a_gif_sent_as_octet_stream_are_served(client):
    jpeg = encode(Image.open(io.BytesIO(GOOD_PNG)).convert("RGB"), "JPEG", quality=95)
    classified(client.post(RAW, params={"top_k": 10}, files={"file": ("x.png", jpeg, "image/png")}))
    gif = encode(Image.open(io.BytesIO(GOOD_PNG)), "GIF")
    classified(post_image(client, RAW, gif, content_type="application/octet-stream", params={"top_k": 10}))


SHAPES = [(1, 1), (1, 4000), (4000, 1), (3, 2000), (2000, 3)]


@pytest.mark.parametrize(("width", "height"), SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_tiny_and_extreme_aspect_images_are_classified_and_explained(client, width, height):
    rng = np.random.default_rng(width * 7 + height)
    image = encode(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    classified(post_image(client, RAW, image, params={"top_k": 10}))
    response = post_image(client, ATTENTION, image)
    assert response.status_code == 200, response.text
    body = response.json()
    grid = np.asarray(body["map"])
    assert grid.shape == (body["grid"]["height"], body["grid"]["width"])
    assert np.isfinite(grid).all() and grid.min() >= 0 and grid.max() <= 1
    overlay = post_image(client, ATTENTION, image, params={"format": "png", "alpha": 0.7})
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png", overlay.text
    assert Image.open(io.BytesIO(overlay.content)).size[0] > 0


@pytest.fixture(scope="module")
def two_digits(held_out) -> tuple[Image.Image, Image.Image]:
    """Two held-out canvases of different digits (RGB), so a wrong frame changes the answer."""
    first = held_out.images[0]
    other = next(c for c, label in zip(held_out.images, held_out.labels, strict=True) if label != held_out.labels[0])
    return canvas_image(first), canvas_image(other)


def test_animated_webp_is_classified_by_its_first_frame(client, two_digits):
    first, second = two_digits
    animated = encode(first, "WEBP", save_all=True, append_images=[second], lossless=True, duration=100)
    assert getattr(Image.open(io.BytesIO(animated)), "n_frames", 1) == 2
    expected = classified(post_image(client, RAW, encode(first), params={"top_k": 10}))
    assert_same_probabilities(classified(post_image(client, RAW, animated, params={"top_k": 10})), expected)
    other = classified(post_image(client, RAW, encode(second), params={"top_k": 10}))
    assert other["predictions"][0]["label"] != expected["predictions"][0]["label"]


def test_animated_gif_with_a_transparent_first_frame_is_composited_on_white(client, two_digits):
    first, second = two_digits
    palette = first.convert("L").convert("P")  # a grey palette: index v holds (v, v, v)
    animated = encode(palette, "GIF", save_all=True, append_images=[second.convert("P")], transparency=0)
    grey = np.asarray(first.convert("L"))
    on_white = canvas_image(np.where(grey == 0, 255, grey).astype(np.uint8))
    expected = classified(post_image(client, RAW, encode(on_white), params={"top_k": 10}))
    assert_same_probabilities(classified(post_image(client, RAW, animated, params={"top_k": 10})), expected)


# --- tiny files claiming huge dimensions --------------------------------------------------------------------


def gif_claiming(width: int, height: int) -> bytes:
    """GIF89a: a logical screen and one image of width x height, with a 1-pixel LZW stream."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + image + b"\x02\x02\x44\x01\x00;"


def bmp_claiming(width: int, height: int) -> bytes:
    """BMP with a BITMAPINFOHEADER for width x height, 24-bit, and 16 bytes of pixels; height < 0 is top-down."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\0" * 16


def tiff_claiming(width: int, height: int) -> bytes:
    """Little-endian TIFF, one 8-bit greyscale strip of 16 bytes declared for width x height."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    tags += [(273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, v) for tag, kind, v in tags)
    return b"II*\x00" + struct.pack("<I", 8 + 16) + b"\0" * 16 + ifd + b"\0\0\0\0"


def webp_claiming(width: int, height: int) -> bytes:
    """Lossless WebP (VP8L) of one colour: one-symbol Huffman codes, so the stream is the same at any size."""
    header = bytes.fromhex("2f") + struct.pack("<I", (width - 1) | (height - 1) << 14)  # alpha 0, version 0
    stream = header + bytes.fromhex("071011fd0f4444ff03")
    chunk = b"VP8L" + struct.pack("<I", len(stream)) + stream + b"\0" * (len(stream) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


CLAIMING: dict[str, Callable[[int, int], bytes]] = {
    "png": blank_png,
    "gif": gif_claiming,
    "bmp": bmp_claiming,
    "tiff": tiff_claiming,
    "jpeg": jpeg_claiming,
    "webp": webp_claiming,
}
# Over our 40-megapixel limit but under Pillow's own bomb threshold (2 x 89 megapixels), so that our check is
# the one that fires; then far over both. WebP and GIF/JPEG headers hold at most 16384 and 65535 a side.
HUGE = [(8000, 6000), (16000, 16000)]
CRAFTED = [pytest.param(fmt, width, height, id=f"{fmt}-{width}x{height}") for fmt in CLAIMING for width, height in HUGE]


@pytest.mark.parametrize("fmt", CLAIMING)
def test_the_crafted_headers_say_what_they_claim(fmt):
    # Small claims open with exactly that size: so the 413s below come from the size, not from a bad header.
    data = CLAIMING[fmt](40, 30)
    assert len(data) < 1024
    assert Image.open(io.BytesIO(data)).size == (40, 30)


@pytest.mark.parametrize(("fmt", "width", "height"), CRAFTED)
def test_a_tiny_file_claiming_huge_dimensions_is_413_from_the_header(client, server, fmt, width, height):
    data = CLAIMING[fmt](width, height)
    assert len(data) < 1024
    with allocates_no_image(server.process.pid):
        error = assert_error(post_image(client, RAW, data), 413, "payload_too_large")
    assert "megapixels" in error["message"] and "40.0" in error["message"]
    assert_still_serving(client)


def test_a_top_down_bmp_claiming_huge_dimensions_is_413(client):
    assert_error(post_image(client, RAW, bmp_claiming(8000, -6000)), 413, "payload_too_large")


def test_crafted_headers_never_move_the_servers_memory(client, server):
    with allocates_no_image(server.process.pid):
        for fmt in CLAIMING:
            for width, height in HUGE:
                assert post_image(client, RAW, CLAIMING[fmt](width, height)).status_code == 413
                claimed = CLAIMING[fmt](width, height)
                files = [("files", ("ok.png", GOOD_PNG, "image/png")), ("files", (fmt, claimed, ""))]
                results = client.post(BATCH, files=files).json()["results"]
                assert results[1]["error"]["code"] == "payload_too_large" and results[0]["predictions"]


# --- multipart, batch limits, query values, unknown names ----------------------------------------------------

BOUNDARY = "vitserve-bad-inputs"


def multipart(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}}


def part(name: str, data: bytes, filename: str | None = "a.png") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()
MULTIPART = [
    # path, httpx arguments, status, code, words the message must hold
    pytest.param(RAW, multipart(part("file", b"hello", None) + END), 400, "bad_request", "text, not a file", id="file-is-text"),
    pytest.param(RAW, multipart(part("file", GOOD_PNG) * 2 + END), 400, "bad_request", "one image per request", id="two-files"),
    pytest.param(RAW, multipart(END), 400, "bad_request", "'file' is missing", id="no-parts"),
    pytest.param(RAW, multipart(part("file", GOOD_PNG)), 400, "bad_request", "", id="unterminated"),
    pytest.param(RAW, multipart(f"--{BOUNDARY}\r\n\r\nxx\r\n".encode() + END), 400, "bad_request", "name", id="no-disposition"),
    pytest.param(RAW, multipart(part("file", GOOD_PNG).replace(BOUNDARY.encode(), b"other") + b"--other--\r\n"), 400, "bad_request", "malformed", id="wrong-boundary"),
    pytest.param(RAW, multipart(b"".join(part(f"f{i}", b"x", None) for i in range(40)) + part("file", GOOD_PNG) + END), 400, "bad_request", "fields", id="40-text-fields"),
    pytest.param(BATCH, multipart(part("files", b"hello", None) + part("files", GOOD_PNG) + END), 400, "bad_request", "text, not a file", id="batch-text-part"),
    pytest.param(BATCH, multipart(END), 400, "bad_request", "'files' is missing", id="batch-no-parts"),
    pytest.param(BATCH, multipart(part("files", GOOD_PNG) * 33 + END), 413, "payload_too_large", "limit is 32", id="batch-33-files"),
    pytest.param(BATCH, multipart(part("files", GOOD_PNG) * 200 + END), 413, "payload_too_large", "limit is 32", id="batch-200-files"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "kwargs", "status", "code", "says"), MULTIPART)
def test_malformed_multipart_and_too_many_files(client, path, kwargs, status, code, says):
    error = assert_error(client.post(path, **kwargs), status, code)
    assert says in error["message"]
    assert_still_serving(client)


QUERIES = [
    # route, query, status, code: each with a good image, so only the query is wrong; the message names it
    *(pytest.param(RAW, {"top_k": v}, 422, "invalid_parameter", id=f"top_k={v[:12]!r}") for v in ["nan", "inf", "-inf", "1e3", "0x10", "٣", "５", "", "-0", str(10**30), "9" * 5000]),
    *(pytest.param(ATTENTION, {"format": "png", "alpha": v}, 422, "invalid_parameter", id=f"alpha={v}") for v in ["nan", "inf", "-inf", "1e309"]),
    *(pytest.param(ATTENTION, {"discard_ratio": v}, 422, "invalid_parameter", id=f"discard_ratio={v}") for v in ["nan", "inf", "-1e-300"]),
    *(pytest.param(ATTENTION, {"method": "layer", "layer": v}, 422, "invalid_parameter", id=f"layer={v}") for v in ["nan", "1.5", "١"]),
    *(pytest.param(ATTENTION, {"method": "layer", "layer": v}, 404, "not_found", id=f"layer={v[:12]}") for v in [str(2**63), str(-(2**63) - 1), str(10**30)]),
    *(pytest.param(ATTENTION, {"method": "layer", "layer": "0", "head": v}, 404, "not_found", id=f"head={v[:12]}") for v in [str(2**64), str(-(10**30))]),
    pytest.param(ATTENTION, {"method": "ロールアウト"}, 422, "invalid_parameter", id="method=unicode"),
    pytest.param(ATTENTION, {"method": "LAYER"}, 422, "invalid_parameter", id="method=LAYER"),
    pytest.param(ATTENTION, {"head_fusion": "ｍｅａｎ"}, 422, "invalid_parameter", id="head_fusion=fullwidth"),
    pytest.param(ATTENTION, {"format": "json\x00"}, 422, "invalid_parameter", id="format=json-nul"),
    pytest.param(ATTENTION, {"format": "png\n"}, 422, "invalid_parameter", id="format=png-newline"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "params", "status", "code"), QUERIES)
def test_nan_inf_huge_and_unicode_query_values(client, path, params, status, code):
    response = post_image(client, path, GOOD_PNG, params=params)
    error = assert_error(response, status, code)
    assert any(name in error["message"] for name in params), error
    assert_still_serving(client)


UNKNOWN = [
    pytest.param("POST", "/v1/models/missing/attention", {"format": "png"}, id="attention-png"),
    pytest.param("POST", "/v1/models/%F0%9F%98%80/classify", {}, id="emoji-name"),
    pytest.param("POST", "/v1/models/%00/classify", {}, id="nul-name"),
    pytest.param("POST", "/v1/models/" + "m" * 2000 + "/classify", {}, id="2000-char-name"),
    pytest.param("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", {}, id="path-traversal"),
]


@pytest.mark.parametrize(("method", "path", "params"), UNKNOWN)
def test_unknown_model_names_of_every_shape_are_404(client, method, path, params):
    kwargs = {"content": GOOD_PNG, "headers": {"content-type": "image/png"}} if method == "POST" else {}
    error = assert_error(client.request(method, path, params=params, **kwargs), 404, "not_found")
    assert "root:" not in error["message"]
    assert_still_serving(client)


# --- the Open Inference Protocol --------------------------------------------------------------------------

GOOD_B64 = base64.b64encode(GOOD_PNG).decode()


def infer(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def pixels(shape: list[int], data: Any = None, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    count = int(np.prod(shape)) if shape and all(0 <= d < 10_000 for d in shape) else 1
    return {
        "name": "pixel_values",
        "shape": shape,
        "datatype": datatype,
        "data": [0.0] * count if data is None else data,
        **extra,
    }


def images(shape: list[int], data: Any = None, datatype: str = "BYTES", **extra: Any) -> dict[str, Any]:
    return {
        "name": "image",
        "shape": shape,
        "datatype": datatype,
        "data": [GOOD_B64] if data is None else data,
        **extra,
    }


def binary(tensor: dict[str, Any], raw: bytes, *, size: Any = None, header_length: str | None = None) -> dict[str, Any]:
    """A binary-extension request: JSON header declaring `size` bytes (default: all of `raw`), then `raw`."""
    declared = {k: v for k, v in tensor.items() if k != "data"}
    declared["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    header = infer([declared])
    length = str(len(header)) if header_length is None else header_length
    return {"content": header + raw, "headers": {"Inference-Header-Content-Length": length}}


def as_json(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": "application/json"}}


def element(data: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<I", len(data) if claimed is None else claimed) + data


HUGE_PNG_B64 = base64.b64encode(blank_png(8000, 6000)).decode()
V2_CASES = [
    # httpx arguments, status, words the message must hold
    # shapes
    pytest.param(as_json(infer([pixels([3, 32, 32])])), 400, "shape", id="pixels-3-dims"),
    pytest.param(as_json(infer([pixels([0, 3, 32, 32], [])])), 400, "shape", id="pixels-batch-0"),
    pytest.param(as_json(infer([pixels([1, 3, 32, 32, 1])])), 400, "shape", id="pixels-5-dims"),
    pytest.param(as_json(infer([pixels([1, 1, 32, 32])])), 400, "shape", id="pixels-1-channel"),
    pytest.param(as_json(infer([pixels([2, 3, 32, 32], [0.0] * 3072)])), 400, "needs 6144 values", id="pixels-too-few-values"),
    pytest.param(as_json(infer([pixels([1, 3, 32, 32], [[0.0] * 3072, [1.0]])])), 400, "FP32", id="pixels-ragged"),
    pytest.param(as_json(infer([images([2])])), 400, "2 elements", id="images-shape-2-data-1"),
    pytest.param(as_json(infer([images([0], [])])), 400, "no images", id="images-none"),
    pytest.param(as_json(infer([images([33], [GOOD_B64] * 33)])), 413, "limit is 32", id="images-33"),
    pytest.param(binary(pixels([33, 3, 32, 32], []), b"\0" * 33 * 12288), 413, "limit is 32", id="pixels-33"),
    # more images than the queue holds: a 503 would invite retries that can never succeed
    pytest.param(binary(pixels([300, 3, 32, 32], []), b"\0" * 300 * 12288), 413, "limit is 32", id="pixels-300"),
    # negative and overflowing dimensions
    pytest.param(as_json(infer([pixels([-1, 3, 32, 32])])), 400, "shape", id="pixels-negative-batch"),
    pytest.param(as_json(infer([images([-1])])), 400, "negative", id="images-negative"),
    pytest.param(as_json(infer([images([-(2**63)])])), 400, "negative", id="images-int64-min"),
    # The element count is checked against VITSERVE_MAX_BATCH_FILES before any element is decoded (issue 16).
    pytest.param(as_json(infer([images([2**70])])), 413, "images in one request", id="images-2^70"),
    pytest.param(as_json(infer([images([2**32, 2**32])])), 413, "images in one request", id="images-product-wraps-int64"),
    pytest.param(as_json(infer([pixels([2**62, 3, 32, 32])])), 413, "limit is 32", id="pixels-2^62-batch"),
    # datatypes and values
    pytest.param(as_json(infer([pixels([1, 3, 32, 32], datatype="INT8")])), 400, "FP32", id="pixels-int8"),
    pytest.param(as_json(infer([pixels([1, 3, 32, 32], datatype="fp32")])), 400, "FP32", id="pixels-lowercase-fp32"),
    pytest.param(as_json(infer([images([1], datatype="FP32")])), 400, "BYTES", id="images-fp32"),
    pytest.param(as_json(infer([images([1], [12345])])), 400, "base64", id="images-number"),
    pytest.param(as_json(infer([images([1], ["@@@"])])), 400, "base64", id="images-bad-base64"),
    pytest.param(as_json(infer([images([1], [HUGE_PNG_B64])])), 413, "megapixels", id="images-claiming-48-megapixels"),
    pytest.param(as_json(infer([pixels([1, 3, 32, 32], ["a"] * 3072)])), 400, "FP32", id="pixels-strings"),
    pytest.param(as_json(infer([pixels([1, 3, 32, 32], [10**400] + [0] * 3071)])), 400, "FP32", id="pixels-int-beyond-float"),
    pytest.param(as_json(infer([pixels([1, 3, 32, 32], {"a": 1})])), 400, "FP32", id="pixels-object"),
    pytest.param(as_json(b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [NaN' + b", 0" * 3071 + b"]}]}"), 400, "NaN", id="pixels-json-nan"),
    pytest.param(as_json(b'{"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [Infinity' + b", 0" * 3071 + b"]}]}"), 400, "infinite", id="pixels-json-infinity"),
    pytest.param(as_json(b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"), 400, "deeply", id="nested-100k-deep"),
    pytest.param(as_json(b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ' + b"[" * 900 + json.dumps(GOOD_B64).encode() + b"]" * 900 + b"}]}"), 200, "", id="nested-900-deep-is-fine"),
    # the request's structure
    pytest.param(as_json(infer([])), 400, "exactly one input", id="no-inputs"),
    pytest.param(as_json(infer([images([1]), images([1])])), 400, "exactly one input", id="two-inputs"),
    pytest.param(as_json(b'{"outputs": []}'), 400, "inputs", id="inputs-missing"),
    pytest.param(as_json(b'[{"inputs": []}]'), 400, "V2 protocol", id="top-level-array"),
    pytest.param(as_json(infer([images([1])], outputs=[{"name": "logits", "parameters": {"classification": 0}}])), 400, "positive integer", id="classification-0"),
    pytest.param(as_json(infer([images([1])], outputs=[{"name": "logits", "parameters": {"classification": True}}])), 400, "positive integer", id="classification-true"),
    pytest.param(as_json(infer([images([1])], outputs=[{"name": "logits", "parameters": {"classification": 10**30}}])), 200, "", id="classification-huge-is-all"),
    pytest.param(as_json("{\"inputs\": [], \"id\": \"ü\"}".encode("utf-16")), 400, "exactly one input", id="utf-16-body"),
    # binary extension: byte counts, header length, BYTES length prefixes
    pytest.param(binary(pixels([1, 3, 32, 32]), b"\0" * 12287, size=12288), 400, "binary_data_size", id="binary-size-beyond-body"),
    pytest.param(binary(pixels([1, 3, 32, 32]), b"\0" * 12289), 400, "needs 12288 bytes", id="binary-size-not-shape"),
    pytest.param(binary(pixels([1, 3, 32, 32]), b"\0" * 12288, size=-4), 400, "binary_data_size", id="binary-size-negative"),
    pytest.param(binary(pixels([1, 3, 32, 32]), b"\0" * 12288, size="12288"), 400, "binary_data_size", id="binary-size-string"),
    pytest.param(binary(pixels([1, 3, 32, 32]), b"\xff\xff\xff\x7f" * 3072), 400, "NaN", id="binary-pixels-nan"),
    pytest.param(binary(images([1]), element(GOOD_PNG), header_length="99999"), 400, "Inference-Header-Content-Length", id="header-length-beyond-body"),
    pytest.param(binary(images([1]), element(GOOD_PNG), header_length="9" * 5000), 400, "Inference-Header-Content-Length", id="header-length-5000-digits"),
    pytest.param(binary(images([1]), element(GOOD_PNG), header_length="-1"), 400, "Inference-Header-Content-Length", id="header-length-negative"),
    pytest.param(binary(images([1]), element(GOOD_PNG), header_length="0x10"), 400, "Inference-Header-Content-Length", id="header-length-hex"),
    pytest.param(binary(images([1]), element(GOOD_PNG), header_length="0"), 400, "JSON", id="header-length-0"),
    pytest.param(binary(images([1]), element(GOOD_PNG), header_length="40"), 400, "JSON", id="header-length-mid-json"),
    pytest.param(binary(images([1]), element(GOOD_PNG, claimed=2**31)), 400, "claims 2147483648 bytes", id="prefix-claims-2GiB"),
    pytest.param(binary(images([1]), element(GOOD_PNG, claimed=len(GOOD_PNG) + 1)), 400, "claims", id="prefix-one-too-many"),
    pytest.param(binary(images([1]), element(GOOD_PNG, claimed=10)), 400, "", id="prefix-claims-fewer"),
    pytest.param(binary(images([1]), element(GOOD_PNG)[:2]), 400, "4-byte length", id="prefix-cut"),
    pytest.param(binary(images([1]), element(GOOD_PNG) * 2), 400, "holds 2", id="two-elements-for-shape-1"),
    pytest.param(binary(images([2]), element(b"") + element(GOOD_PNG)), 400, "empty", id="empty-element"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "status", "says"), V2_CASES)
def test_bad_v2_requests_get_a_protocol_error(client, kwargs, status, says):
    response = client.post(INFER, **kwargs)
    assert response.status_code == status, response.text
    if status != 200:
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and len(body["error"]) > 10, body
        assert says in body["error"], body
    assert_v2_still_serving(client)


def test_a_header_length_in_non_ascii_digits_is_400(client):
    # "²" passes str.isdigit() but not int(): a header of Latin-1 bytes must not reach int() unchecked.
    headers = {"Inference-Header-Content-Length": b"\xb2"}
    response = client.post(INFER, content=infer([images([1])]), headers=headers)
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]
    assert_v2_still_serving(client)


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/v2/models/missing/infer", "POST"),
        (f"/v2/models/{MODEL}/versions/7/infer", "POST"),
        ("/v2/models/missing", "GET"),
        ("/v2/models/missing/ready", "GET"),
        (f"/v2/models/{MODEL}/versions/%00/ready", "GET"),
    ],
    ids=["infer", "infer-version", "metadata", "ready", "ready-nul-version"],
)
def test_unknown_v2_model_or_version_is_404(client, path, method):
    response = client.request(method, path, content=infer([images([1])]) if method == "POST" else None)
    assert response.status_code == 404, response.text
    assert "not" in response.json()["error"]
    assert_v2_still_serving(client)


def assert_v2_still_serving(client: httpx.Client) -> None:
    response = client.post(INFER, **as_json(infer([images([1])])))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 10]
