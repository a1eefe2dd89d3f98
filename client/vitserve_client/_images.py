"""Turn what a caller holds (a path, bytes, a file, a PIL image, a numpy array) into an upload.

Encoded files are sent as they are: the server reads the format from the bytes, so re-encoding would only
cost time and, for JPEG, quality. PIL images and arrays are encoded as PNG (lossless). Everything becomes bytes
before the first attempt, so a retry sends the same body again.
"""

from __future__ import annotations

import io
import mimetypes
import os
import sys
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray
else:
    ImageInput = Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Magic numbers of the formats the server accepts (and ICO, so a refused format still gets an honest type).
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (PNG_SIGNATURE, "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"GIF87a", "image/gif", ".gif"),
    (b"GIF89a", "image/gif", ".gif"),
    (b"BM", "image/bmp", ".bmp"),
    (b"II*\x00", "image/tiff", ".tiff"),
    (b"MM\x00*", "image/tiff", ".tiff"),
    (b"\x00\x00\x01\x00", "image/vnd.microsoft.icon", ".ico"),
)
# Modes a PNG can hold as they are; others (CMYK, YCbCr, LAB, HSV, F) are converted to RGB first.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


class Upload(NamedTuple):
    """One multipart file: what httpx's `files=` takes."""

    filename: str
    data: bytes
    content_type: str


def sniff(data: bytes) -> tuple[str, str] | None:
    """(content type, suffix) from the first bytes, or None when the format is not recognised."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", ".webp"
    for magic, content_type, suffix in _SIGNATURES:
        if data.startswith(magic):
            return content_type, suffix
    return None


def _encoded(data: bytes, name: str | None) -> Upload:
    found = sniff(data)
    if found is None and name:
        guessed = mimetypes.guess_type(name)[0]
        found = (guessed, "") if guessed else None
    content_type, suffix = found or ("application/octet-stream", "")
    return Upload(name or f"image{suffix}", data, content_type)


def _png(image: Image.Image, name: str) -> Upload:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: the bytes only cross a network once
    return Upload(name, buffer.getvalue(), "image/png")


def _array_png(array: np.ndarray) -> Upload:
    import numpy as np

    if array.dtype != np.uint8:
        raise TypeError(
            f"arrays must be uint8 (got {array.dtype}); scale floats in [0, 1] with (a * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"arrays must be HxW (gray) or HxWx3/4 (RGB/RGBA); got shape {array.shape}")
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("sending numpy arrays needs Pillow: pip install 'vitserve-client[numpy]'") from e
    return _png(Image.fromarray(np.ascontiguousarray(array)), "array.png")


def to_upload(image: ImageInput) -> Upload:
    """The upload for one image; TypeError for anything that is not an image input."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return _encoded(f.read(), os.path.basename(os.fspath(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _encoded(bytes(image), None)
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("file objects must be opened in binary mode ('rb')")
        name = getattr(image, "name", None)
        return _encoded(data, os.path.basename(name) if isinstance(name, str) else None)
    # Checked through sys.modules: an object can only be a PIL image or an array if its library is loaded,
    # so the optional dependencies are never imported here.
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        return _png(image, "image.png")
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(image, numpy.ndarray):
        return _array_png(image)
    raise TypeError(
        f"cannot send {type(image).__name__} as an image; pass a path, bytes, a binary file object, "
        "a PIL image or a uint8 numpy array"
    )
