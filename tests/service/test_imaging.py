"""service.core.imaging.decode_image on files made in memory.

Every accepted format and colour mode, EXIF rotation, damaged and hostile input (truncation, garbage,
decompression bombs), refused formats and JPEG draft decoding.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import ExifTags, GifImagePlugin, Image, ImageFile, ImageSequence

from service.core.imaging import decode_image, original_size
from service.errors import BadImage, PayloadTooLarge, ServiceError, UnsupportedMediaType
from vit_artifact.metadata import Preprocessing
from vit_artifact.preprocessing import preprocess

LIMIT = 40_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes, **kwargs: Any) -> Image.Image:
    image = decode_image(data, max_pixels=kwargs.pop("max_pixels", LIMIT), **kwargs)
    assert image.mode == "RGB"
    return image


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))  # type: ignore[arg-type]


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= tolerance, (actual, expected)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: shows any rotation or mirroring."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    return image


# -- formats -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_lossless_formats_round_trip(fmt: str, params: dict[str, Any], astronaut: Image.Image) -> None:
    decoded = decode(encode(astronaut, fmt, **params))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(astronaut))


def test_jpeg(astronaut: Image.Image) -> None:
    decoded = decode(encode(astronaut, "JPEG", quality=95))
    assert decoded.size == astronaut.size
    assert np.abs(np.asarray(decoded, np.int16) - np.asarray(astronaut, np.int16)).mean() < 3


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, (0, 255, 0), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert len(list(ImageSequence.Iterator(Image.open(io.BytesIO(data))))) == 3  # the file really is animated
    assert pixel(decode(data), (16, 16)) == RED


def test_animated_webp_and_multipage_tiff_give_the_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (BLUE, RED)]
    for fmt, params in (("WEBP", {"lossless": True}), ("TIFF", {})):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
        assert pixel(decode(data), (16, 16)) == BLUE, fmt


def test_many_frames_cost_one(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = [Image.new("L", (64, 64), i) for i in range(300)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    sought: list[int] = []  # every frame Pillow was asked to go to
    seek = GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(
        GifImagePlugin.GifImageFile, "_seek", lambda im, frame, *a: sought.append(frame) or seek(im, frame, *a)
    )
    image = decode(data)
    assert sought == [0]  # the first frame only: the other 299 were never read
    assert pixel(image, (0, 0)) == (0, 0, 0)


# -- colour modes --------------------------------------------------------------------------------------------


def test_greyscale_and_one_bit() -> None:
    assert pixel(decode(encode(Image.new("L", (8, 8), 77), "PNG")), (3, 3)) == (77, 77, 77)
    checker = Image.fromarray(np.indices((8, 8)).sum(axis=0) % 2 == 0)
    assert checker.mode == "1"
    decoded = decode(encode(checker, "PNG"))
    assert pixel(decoded, (0, 0)) == WHITE and pixel(decoded, (1, 0)) == (0, 0, 0)


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    decoded = decode(encode(image, "PNG", transparency=0))
    assert pixel(decoded, (0, 0)) == WHITE and pixel(decoded, (6, 0)) == RED
    gif = decode(encode(image, "GIF", transparency=0))
    assert pixel(gif, (0, 0)) == WHITE and pixel(gif, (6, 0)) == RED


def test_alpha_is_composited_on_white_not_black() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    for fmt, params in (("PNG", {}), ("WEBP", {"lossless": True, "exact": True}), ("TIFF", {})):
        decoded = decode(encode(image, fmt, **params))
        assert pixel(decoded, (0, 0)) == WHITE, fmt  # transparent red: not red, not black
        assert pixel(decoded, (1, 0)) == BLUE, fmt
        assert_close(pixel(decoded, (2, 0)), (127, 127, 127), tolerance=1)
    grey_alpha = Image.new("LA", (2, 1))
    grey_alpha.putdata([(0, 0), (0, 255)])
    decoded = decode(encode(grey_alpha, "PNG"))
    assert pixel(decoded, (0, 0)) == WHITE and pixel(decoded, (1, 0)) == (0, 0, 0)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_close(pixel(decode(data), (8, 8)), (0, 255, 255), tolerance=3)  # cyan


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = np.asarray(decode(data))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 4, 128, 255])  # round(v / 257)
    assert (decoded == decoded[..., :1]).all()  # grey


def test_thirty_two_bit_integer_and_float_greyscale() -> None:
    def grey_row(values: np.ndarray) -> np.ndarray:
        return np.asarray(decode(encode(Image.fromarray(values), "TIFF")))[0, :, 0]

    # outside 16 bits: stretched, (0 + 1000) / 100000 * 255 = 2.55
    np.testing.assert_array_equal(grey_row(np.array([[-1000, 0, 99_000]], dtype=np.int32)), [0, 3, 255])
    # floats in 0..1: times 255
    np.testing.assert_array_equal(grey_row(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), [0, 128, 255])
    # other floats: stretched, NaN as the lowest value
    np.testing.assert_array_equal(grey_row(np.array([[10.0, 20.0, np.nan]], dtype=np.float32)), [0, 255, 0])


# -- EXIF orientation ----------------------------------------------------------------------------------------


def with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize(
    ("orientation", "size", "first", "second"),
    [
        (1, (40, 20), RED, BLUE),  # as stored: red left, blue right
        (3, (40, 20), BLUE, RED),  # rotated 180: blue left
        (6, (20, 40), RED, BLUE),  # display rotated 90 clockwise: red on top
        (8, (20, 40), BLUE, RED),  # 90 counter-clockwise: blue on top
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(
    fmt: str, orientation: int, size: tuple[int, int], first: tuple[int, ...], second: tuple[int, ...]
) -> None:
    decoded = decode(with_orientation(halves(), orientation, fmt))
    assert decoded.size == size and original_size(decoded) == size
    near, far = ((5, 10), (35, 10)) if size[0] > size[1] else ((10, 5), (10, 35))
    assert_close(pixel(decoded, near), first, tolerance=8)
    assert_close(pixel(decoded, far), second, tolerance=8)


# -- damaged and hostile input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 64,
        np.random.default_rng(0).bytes(4096),
        b"<!DOCTYPE html><html><body><img src=cat.jpg></body></html>",
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        b"just some text\n",
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing after
    ],
    ids=["zeros", "random", "html", "pdf", "text", "png-signature"],
)
def test_bytes_that_are_no_image(data: bytes) -> None:
    with pytest.raises(BadImage, match="could not decode the image") as info:
        decode(data)
    assert "JPEG, PNG, WebP, BMP, GIF or TIFF" in info.value.message
    assert info.value.status == 400


def test_empty_body() -> None:
    with pytest.raises(BadImage, match="empty"):
        decode(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files(fmt: str, astronaut: Image.Image) -> None:
    data = encode(astronaut.convert("P") if fmt == "GIF" else astronaut, fmt)
    for keep in (len(data) // 2, len(data) - 200):
        if fmt == "JPEG":  # opens fine: the header is intact; the error only comes at load()
            Image.open(io.BytesIO(data[:keep]))
        with pytest.raises(BadImage, match="could not decode the image"):
            decode(data[:keep])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFF tags it skips
def test_damaged_files_only_ever_raise_service_errors(astronaut: Image.Image) -> None:
    """Cut and flipped bytes: each outcome is an RGB image or a ServiceError, never a Pillow exception."""
    rng = np.random.default_rng(1)
    small = astronaut.resize((48, 48))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"):
        data = bytearray(encode(small, fmt))
        for _ in range(25):
            damaged = data.copy()
            for position in rng.integers(0, len(damaged), size=int(rng.integers(1, 8))):
                damaged[position] = int(rng.integers(0, 256))
            damaged = damaged[: int(rng.integers(len(damaged) // 2, len(damaged) + 1))]
            with contextlib.suppress(ServiceError):
                decode(bytes(damaged), max_pixels=1_000_000)


# -- size limits ---------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (1-bit greyscale) but carries a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def no_pixels_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image's pixel data is decoded (Pillow's `load`): refusals come from the header."""

    def load(image: ImageFile.ImageFile) -> None:
        raise AssertionError(f"the {image.format} image's {image.size} pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decompression_bomb_is_refused_from_the_header(no_pixels_read: None) -> None:
    with pytest.raises(PayloadTooLarge, match=r"the limit is 40\.0 megapixels") as info:
        decode(png_header(40_000, 40_000))  # 1.6 gigapixels, never decoded
    assert info.value.status == 413


def test_too_many_pixels_names_the_size(no_pixels_read: None) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode(jpeg_claiming(10_000, 8_000))
    assert info.value.message == "image is 10000x8000 pixels (80.0 megapixels); the limit is 40.0 megapixels"
    assert info.value.detail == {"width": 10_000, "height": 8_000, "max_pixels": LIMIT}


def test_pixel_limit_is_inclusive() -> None:
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert decode(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(PayloadTooLarge):
        decode(data, max_pixels=4999)


# -- refused formats -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_other_formats_are_unsupported_media(fmt: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode(encode(Image.new("RGB", (16, 16), RED), fmt))
    assert info.value.status == 415
    assert info.value.message == f"{fmt} images are not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF"


ALLOWED_FILES = [
    ("JPEG", {}),
    ("PNG", {}),
    ("WEBP", {}),
    ("BMP", {}),
    ("GIF", {}),
    ("TIFF", {}),
    ("TIFF", {"big_tiff": True}),
    ("MPO", {}),  # JPEG with extra frames, as phones write it: the JPEG plugin opens it
]


@pytest.fixture()
def plugins_that_parse(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The formats whose Pillow plugin got to parse bytes (their factories are wrapped to record it)."""
    Image.init()
    parsed: list[str] = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):

        def recording(*args: Any, _fmt: str = fmt, _factory: Any = factory) -> Any:
            parsed.append(_fmt)
            return _factory(*args)

        monkeypatch.setitem(Image.OPEN, fmt, (recording, accept))
    return parsed


@pytest.mark.parametrize(("fmt", "params"), ALLOWED_FILES, ids=[f"{f}{'-big' if p else ''}" for f, p in ALLOWED_FILES])
def test_each_allowed_format_is_parsed_by_its_own_plugin_only(
    fmt: str, params: dict[str, Any], plugins_that_parse: list[str]
) -> None:
    image = halves()
    data = encode(image, fmt, **({"save_all": True, "append_images": [image]} if fmt == "MPO" else params))
    decoded = decode(data)
    assert decoded.size == image.size
    assert_close(pixel(decoded, (5, 10)), RED, tolerance=40)  # lossy JPEG / WebP, a GIF palette
    assert plugins_that_parse == ["JPEG" if fmt == "MPO" else fmt]


SIGNED_REFUSED = ["ICO", "PSD", "PPM", "PCX", "SGI", "QOI", "DDS", "EPS", "XBM", "MSP", "DIB", "ICNS"]


@pytest.mark.parametrize("fmt", SIGNED_REFUSED)
def test_a_refused_format_is_named_without_its_plugin_parsing(fmt: str, plugins_that_parse: list[str]) -> None:
    if fmt == "PSD":  # Pillow reads PSD but cannot write it: a 1x1 greyscale file, by the specification
        data = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 1, 1, 1, 8, 1) + b"\x00" * 12 + b"\x00\x00\x00"
    else:
        data = encode(Image.new("1" if fmt in ("XBM", "MSP") else "RGB", (16, 16)), fmt)
    with pytest.raises(UnsupportedMediaType) as info:
        decode(data)
    assert info.value.message == f"{fmt} images are not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF"
    assert info.value.detail == {"format": fmt, "accepted": ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]}
    # Named from its signature: no refused plugin parsed the bytes, but for TGA's where the signature is ICO's.
    assert plugins_that_parse == (["TGA"] if fmt == "ICO" else [])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("rle", [False, True], ids=["raw", "rle"])
def test_tga_has_no_signature_and_is_named_from_its_header(mode: str, rle: bool) -> None:
    # An uncompressed truecolour TGA starts with \0\0\2\0, all of CUR's signature: the header decides.
    data = encode(Image.new(mode, (16, 16)), "TGA", compression="tga_rle" if rle else None)
    with pytest.raises(UnsupportedMediaType) as info:
        decode(data)
    assert info.value.detail["format"] == "TGA"


def _body(fmt: str) -> bytes:
    return encode(halves(), fmt)


@pytest.mark.parametrize(
    ("header", "body"),
    [("PNG", "TIFF"), ("TIFF", "PNG"), ("JPEG", "GIF"), ("GIF", "PNG"), ("WEBP", "BMP"), ("BMP", "PNG")],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the TIFF tags it cannot read
def test_a_signature_over_another_formats_body_is_a_bad_image(
    header: str, body: str, plugins_that_parse: list[str]
) -> None:
    """The signature picks the plugin; the rest of the file is not that format: 400, and no other plugin tries."""
    signature = {"PNG": 8, "TIFF": 4, "JPEG": 3, "GIF": 6, "BMP": 2, "WEBP": 12}[header]
    data = _body(header)[:signature] + _body(body)[signature:]
    with pytest.raises(BadImage, match="could not decode the image") as info:
        decode(data)
    assert info.value.status == 400
    assert set(plugins_that_parse) <= {header}  # WebP's plugin checks its chunk id before it parses, and stops


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect width="32" height="32"/></svg>',
    ],
    ids=["pdf", "svg"],
)
def test_formats_pillow_cannot_read_stay_bad_images(data: bytes) -> None:
    with pytest.raises(BadImage) as info:
        decode(data)
    assert info.value.message == (
        "could not decode the image: the bytes are not a JPEG, PNG, WebP, BMP, GIF or TIFF file, or the file is damaged"
    )


# -- JPEG draft decoding -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg(astronaut: Image.Image) -> bytes:
    return encode(astronaut.resize((2000, 1500), Image.Resampling.BICUBIC), "JPEG", quality=90)


def test_draft_decodes_large_jpegs_smaller_but_not_below_the_target(large_jpeg: bytes) -> None:
    full = decode(large_jpeg)
    assert full.size == (2000, 1500)
    reduced = decode(large_jpeg, target_size=(224, 224))
    # scale 1/4: 1/8 would give 250x188, below 224 in height
    assert reduced.size == (500, 375)
    assert original_size(reduced) == (2000, 1500)
    assert decode(large_jpeg, target_size=(1000, 1000)).size == (2000, 1500)  # < 2x the target: no reduction


def test_draft_respects_exif_rotation(astronaut: Image.Image) -> None:
    stored = astronaut.resize((2000, 1500))
    data = with_orientation(stored, 6)  # displayed 1500 wide, 2000 tall
    decoded = decode(data, target_size=(300, 1000))  # (height, width) of the upright image
    assert decoded.width >= 1000 and decoded.height >= 300
    assert original_size(decoded) == (1500, 2000)
    assert decode(data, target_size=(300, 300)).size == (375, 500)


def test_draft_only_touches_jpeg(astronaut: Image.Image) -> None:
    big_png = encode(astronaut.resize((1024, 1024)), "PNG")
    assert decode(big_png, target_size=(224, 224)).size == (1024, 1024)


@pytest.mark.parametrize("name", ["astronaut", "hubble_deep_field"])
def test_draft_barely_moves_the_model_input(name: str) -> None:
    """The tradeoff documented in imaging._draft, measured on photos with native detail.

    Measured (JPEG q95, halved by the draft: astronaut 512 -> 256, hubble 1000x872 -> 500x436; bicubic and
    bilinear 248/224), in steps of 1/255: mean abs difference 1.5-1.6 (astronaut), 0.6 (hubble); 99th
    percentile 12-14 and 3-4; max 40 and 15, on sharp edges. The same region, slightly different detail.
    """
    data = encode(Image.fromarray(getattr(skimage.data, name)()), "JPEG", quality=95)
    spec = Preprocessing(
        resize="shortest_edge", resize_size=(248, 248), crop_size=(224, 224), interpolation="bicubic",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    full, drafted = decode(data), decode(data, target_size=spec.resize_size)
    assert drafted.width * 2 <= full.width + 1  # the draft did reduce
    diff = np.abs(preprocess(full, spec) - preprocess(drafted, spec)) * 255
    assert diff.mean() < 3 and diff.max() < 64


def test_without_draft_a_large_jpeg_decodes_at_full_resolution(large_jpeg: bytes) -> None:
    """`VITSERVE_JPEG_DRAFT=false`: the same pixels as a decode that names no target, bit for bit."""
    strict = decode(large_jpeg, target_size=(224, 224), draft=False)
    np.testing.assert_array_equal(np.asarray(strict), np.asarray(decode(large_jpeg)))
    assert strict.size == original_size(strict) == (2000, 1500)


def test_without_draft_the_model_input_is_the_full_decode(large_jpeg: bytes) -> None:
    from service.core.pipeline import prepare
    from tests.conftest import DEFAULT_MODEL
    from vit_artifact.metadata import read_metadata

    meta = read_metadata(DEFAULT_MODEL)
    full = preprocess(decode(large_jpeg), meta.preprocessing)
    strict = prepare(large_jpeg, meta, max_pixels=LIMIT, jpeg_draft=False).pixels
    np.testing.assert_array_equal(strict, full)
    drafted = prepare(large_jpeg, meta, max_pixels=LIMIT).pixels  # the default: 1/8 scale for a 32 px model
    np.testing.assert_array_equal(drafted, preprocess(decode(large_jpeg, target_size=(32, 32)), meta.preprocessing))
    assert np.abs(drafted - full).max() > 0  # the setting changes what the model sees
