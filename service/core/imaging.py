"""Decoding untrusted image bytes into RGB Pillow images (Pillow and numpy only; no torch at serving time).

Everything a client sends leaves `decode_image` as an 8-bit RGB image or as a `ServiceError`:

- format: read from the bytes, never from a declared content type. A table of signatures (`SIGNATURES`) picks
  one of `ALLOWED_FORMATS` from the first bytes, and only that Pillow plugin ever parses them (`_sniff`): a
  plugin for a format we refuse never sees client bytes. Another format Pillow knows is named from Pillow's own
  signature checks (a byte comparison, no parsing) and refused with 415; bytes that are no image, or a damaged
  file of an allowed format, with 400.
- size: width x height from the header is checked against `max_pixels` before any pixel is decoded (413), and
  only the first frame of an animated or multi-page file is ever read, so a file of many frames costs one.
- orientation: the EXIF rotation is applied, so the model sees the photo the way its owner does.
- colour: every mode becomes RGB; transparency is composited on white (as transformers' `convert_to_rgb`
  does), 16-bit and float greyscale are scaled to 0..255, not clipped.

When the service names a `target_size`, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale (see `_draft`;
`draft=False`, the `VITSERVE_JPEG_DRAFT` setting, turns it off); the image's full size is kept in
`image.info[ORIGINAL_SIZE]` (read it with `original_size`) so that overlays can be placed on the user's original
image.

Pillow decodes every format. Measured against libjpeg-turbo's own API (simplejpeg) and OpenCV on photos
(benchmarks/decode.py, results in benchmarks/results/decode.md): the same pixels bit for bit, since all three
run libjpeg-turbo, and no clear gain once the decoded pixels are in the Pillow image the resize needs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.errors import BadImage, PayloadTooLarge, ServiceError, UnsupportedMediaType

if TYPE_CHECKING:  # a type only: decoding needs no metrics (benchmarks' Triton peer imports this module alone)
    from service.core.budgets import Reservation

# Pillow's format names; only these plugins ever parse client bytes. The JPEG plugin also opens the JPEGs with
# extra frames that many phones and cameras write, which Pillow then names MPO.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
ACCEPTED = "JPEG, PNG, WebP, BMP, GIF or TIFF"

SIGNATURES: tuple[tuple[str, int, bytes], ...] = (
    # (format, offset, bytes): the file's first bytes, as each format's specification fixes them.
    ("JPEG", 0, b"\xff\xd8\xff"),  # SOI, then the first marker's 0xFF
    ("PNG", 0, b"\x89PNG\r\n\x1a\n"),
    ("WEBP", 8, b"WEBP"),  # a RIFF container (checked below) whose form type is WEBP
    ("BMP", 0, b"BM"),
    ("GIF", 0, b"GIF87a"),
    ("GIF", 0, b"GIF89a"),
    ("TIFF", 0, b"II*\x00"),  # little-endian
    ("TIFF", 0, b"MM\x00*"),  # big-endian
    ("TIFF", 0, b"II+\x00"),  # BigTIFF
    ("TIFF", 0, b"MM\x00+"),
)
_RIFF = b"RIFF"
# TGA has no signature: Pillow can only name it by parsing its 18-byte header, and it is the one format without
# a signature that clients send (games, old scanners), so its plugin is the one refused plugin that reads client
# bytes. A TGA header can begin with all there is of ICO's and CUR's signatures, so where it holds up it wins.
_TGA_LOOKALIKES = ("ICO", "CUR")

ORIGINAL_SIZE = "vitserve.original_size"
"""`image.info` key: (width, height) of the upright image at full resolution, before any draft reduction."""

_ORIENTATION = ExifTags.Base.Orientation
_ORIENTATIONS_SWAPPING_AXES = (5, 6, 7, 8)  # transpose, rotate 90/270, transverse
_JPEG_FORMATS = ("JPEG", "MPO")
# 16-bit values 0..65535 onto 0..255: round(v / 257) maps 65535 to 255 exactly and keeps every step linear.
# Bytes a pixel takes in Pillow's memory (not in the file): one band of 8 bits, 16-bit modes 2, and every other
# mode 4, RGB and LA included (Pillow pads them to 32 bits).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_BAND_PIXELS = 1 << 18  # the deep-to-8-bit conversion reads this many pixels at a time
_BAND_TEMPORARIES = 8 * 4 * _BAND_PIXELS  # its float32 temporaries of one band, at most eight at once
# A codec's own buffers (zlib window, rows, strips: about 100 KB) and the allocator's slack in a long-lived
# process (a decode measured in a test process that had run the whole suite took 10 MiB more than in a fresh one,
# and once the suite had gRPC and tracing tests too, 16 MiB and 26 KB more).
_DECODER_STATE = 24 * 2**20
_UINT16_TO_UINT8 = np.rint(np.arange(65536) / 257.0).astype(np.uint8)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    target_size: tuple[int, int] | None = None,
    draft: bool = True,
    reservation: Reservation | None = None,
) -> Image.Image:
    """Decode `data` into a loaded RGB image; or raise BadImage, UnsupportedMediaType or PayloadTooLarge.

    `target_size` (height, width) is the size the image will be resized to next; with `draft`, a JPEG at least
    twice that size on both sides is decoded at reduced scale, never below it (`_draft`); without, or without a
    `target_size`, every image is decoded at full resolution. With a `reservation`, the memory the
    decode will take (`decode_cost`) is reserved from its budget before any pixel is decoded (503 when the
    budget stays full); the caller gives it back when it drops the image.
    """
    if not data:
        raise BadImage(f"the image is empty (0 bytes); send the bytes of a {ACCEPTED} file")
    image = _open(data, max_pixels)
    _check_size(image.size, max_pixels)
    try:
        return _decode(image, target_size if draft else None, reservation)
    except ServiceError:
        raise
    except Exception as e:  # Pillow raises many types on damaged data; each one is the client's bad file.
        raise BadImage(
            f"could not decode the image: the {image.format} data is damaged or truncated ({_reason(e)})",
            detail={"format": image.format},
        ) from e


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the upright image before any draft reduction; `image.size` if it was not reduced."""
    size = image.info.get(ORIGINAL_SIZE)
    return (int(size[0]), int(size[1])) if size is not None else image.size


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header (no pixels are decoded) with the plugin of the format the signature names, only."""
    fmt = _sniff(data)
    if fmt is None:
        refused = _refused_format(data)
        if refused is not None:
            raise UnsupportedMediaType(
                f"{refused} images are not supported; send {ACCEPTED}",
                detail={"format": refused, "accepted": list(ALLOWED_FORMATS)},
            )
        raise _not_an_image()
    try:
        return Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's process-wide limit fired while parsing the header: the image is far over any sane limit.
        raise PayloadTooLarge(
            f"image has too many pixels to open; the limit is {max_pixels / 1e6:.1f} megapixels",
            detail={"max_pixels": max_pixels},
        ) from e
    except UnidentifiedImageError:  # the signature of an allowed format, but its plugin found no such file
        raise _not_an_image() from None
    except Exception as e:
        raise BadImage(f"could not decode the image: the header is damaged ({_reason(e)})") from e


def _sniff(data: bytes) -> str | None:
    """The allowed format whose signature `data` starts with, or None."""
    for fmt, offset, signature in SIGNATURES:
        if data.startswith(signature, offset) and (fmt != "WEBP" or data.startswith(_RIFF)):
            return fmt
    return None


def _not_an_image() -> BadImage:
    return BadImage(f"could not decode the image: the bytes are not a {ACCEPTED} file, or the file is damaged")


def _refused_format(data: bytes) -> str | None:
    """Name of a format Pillow can read but we refuse, so the client hears 415 and not 'damaged file'."""
    named = _named_by_signature(data[:16])  # the prefix `Image.open` gives the same checks
    if (named is None or named in _TGA_LOOKALIKES) and _is_tga(data):
        return "TGA"
    return named


def _named_by_signature(prefix: bytes) -> str | None:
    """The first refused format whose signature check, as Pillow registers it with the plugin
    (`Image.OPEN[format][1]`), accepts `prefix`: a byte comparison; the plugin itself never runs."""
    Image.init()  # registers every plugin's check (once per process)
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if fmt in ALLOWED_FORMATS or accept is None:
            continue
        try:
            named = accept(prefix)
        except Exception:  # a check that indexes past a short prefix
            continue
        if named and not isinstance(named, str):  # a str: "this format, but Pillow lacks its codec"
            return fmt
    return None


def _is_tga(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data), formats=["TGA"]):  # header only; never loaded
            return True
    except Exception:
        return False


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {max_pixels / 1e6:.1f} megapixels",
            detail={"width": width, "height": height, "max_pixels": max_pixels},
        )


def decode_cost(image: Image.Image) -> int:
    """Bytes the decode of an opened (not loaded) image takes at its peak (see `_to_rgb`), as Pillow holds pixels
    (`_BYTES_PER_PIXEL`): the file's mode, then the RGB copy (or, for RGB, the copy an EXIF rotation makes); for
    16-bit and float modes the 8-bit copy made in bands before the deep pixels are freed; for transparent images
    the RGBA copy (when the mode is not RGBA already) under the RGB composite. Measured against VmHWM for the
    worst cases (tests/service/test_memory.py)."""
    pixels = image.size[0] * image.size[1]
    stored = _BYTES_PER_PIXEL.get(image.mode, 4)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _DECODER_STATE + pixels * max(stored + 1, 1 + 4) + _BAND_TEMPORARIES  # deep + grey, grey + RGB
    if "A" in image.getbands() or "transparency" in image.info:
        return _DECODER_STATE + pixels * (stored + (0 if image.mode == "RGBA" else 4) + 4)
    return _DECODER_STATE + pixels * (stored + 4)


def _decode(image: Image.Image, target_size: tuple[int, int] | None, reservation: Reservation | None) -> Image.Image:
    full_size = image.size
    if target_size is not None and image.format in _JPEG_FORMATS:
        _draft(image, target_size)
    if reservation is not None:
        reservation.take(decode_cost(image), f"a {image.size[0]}x{image.size[1]} {image.mode} image")
    image.load()  # the first frame only: we never seek
    # Read after load: a PNG may carry its EXIF after the pixel data.
    if image.getexif().get(_ORIENTATION, 1) in _ORIENTATIONS_SWAPPING_AXES:
        full_size = (full_size[1], full_size[0])
    ImageOps.exif_transpose(image, in_place=True)
    rgb = _to_rgb(image)
    rgb.info[ORIGINAL_SIZE] = full_size
    return rgb


def _draft(image: Image.Image, target_size: tuple[int, int]) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, as far as the result stays >= `target_size` on both sides.

    The tradeoff: a 12-megapixel photo decodes several times faster and in a fraction of the memory, and the
    resize that follows still only shrinks, so the crop is the same region. But the model then sees a
    DCT-domain downscale followed by the framework's resize instead of one resize from full resolution, which
    moves pixel values slightly (README's images paragraph states the tolerance; benchmarks/decode.py measures
    it). Export-time parity checks decode without it, and so does the service with `VITSERVE_JPEG_DRAFT=false`.
    """
    height, width = target_size
    if image.getexif().get(_ORIENTATION, 1) in _ORIENTATIONS_SWAPPING_AXES:
        height, width = width, height  # the stored frame is rotated into place after decoding
    image.draft("RGB", (width, height))


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB; a source it copies from is closed as soon as the copy exists, so that a 40-megapixel
    image is held about twice at most, not four times (`decode_cost` counts the peak)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _replaced(image, _to_8bit_grey(image))
    if any(band in ("A", "a") for band in image.getbands()) or image.info.get("transparency") is not None:
        # White, not black: transparent pixels often hold black; logos and cut-outs are made for white pages.
        rgba = image if image.mode == "RGBA" else _replaced(image, image.convert("RGBA"))
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)  # RGBA onto RGB, masked by its alpha: no RGB or alpha copy of it is made
        return _replaced(rgba, white)
    return image if image.mode == "RGB" else _replaced(image, image.convert("RGB"))


def _replaced(old: Image.Image, new: Image.Image) -> Image.Image:
    """`new`, with `old`'s pixels freed now rather than when the last reference goes (the caller keeps one)."""
    old.close()
    return new


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 0..255 (Pillow's own convert clips at 255 instead).

    Reads the pixels in bands of rows (`np.asarray` of a whole image copies it), so a 40-megapixel float image
    needs a few MB of temporaries besides the 8-bit result."""
    out = np.empty((image.height, image.width), np.uint8)
    if image.mode.startswith("I;16"):
        for rows, band in _bands(image):
            out[rows] = _UINT16_TO_UINT8[band]
        return Image.fromarray(out)
    low, high = _finite_range(image)
    if image.mode == "I" and low >= 0 and high <= 65535:  # Pillow keeps 16-bit data of some files in mode I
        for rows, band in _bands(image):
            out[rows] = _UINT16_TO_UINT8[band]
        return Image.fromarray(out)
    if image.mode == "F" and low >= 0 and high <= 1:
        offset, scale = 0.0, 255.0
    else:  # an unknown range: stretch what is there
        offset, scale = float(low), 255.0 / (float(high) - float(low) or 1.0)
    for rows, band in _bands(image):
        values = np.nan_to_num(band.astype(np.float32), nan=offset)
        out[rows] = np.rint(np.clip((values - offset) * scale, 0, 255))
    return Image.fromarray(out)


def _bands(image: Image.Image, pixels: int = _BAND_PIXELS) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, their values) of about `pixels` pixels at a time."""
    step = max(1, pixels // max(1, image.width))
    for top in range(0, image.height, step):
        bottom = min(top + step, image.height)
        yield slice(top, bottom), np.asarray(image.crop((0, top, image.width, bottom)))


def _finite_range(image: Image.Image) -> tuple[float, float]:
    low, high = np.inf, -np.inf
    for _, band in _bands(image):
        finite = band[np.isfinite(band)] if band.dtype.kind == "f" else band
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (low, high) if low <= high else (0.0, 0.0)


def _reason(error: Exception) -> str:
    return (str(error) or type(error).__name__)[:200]
