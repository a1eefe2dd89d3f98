"""Turning what a caller holds into an upload: formats are recognised from the bytes, arrays become PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vitserve_client._images import sniff, to_upload


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
        ("WEBP", "image/webp"),
        ("ICO", "image/vnd.microsoft.icon"),
    ],
)
def test_formats_are_recognised_from_the_bytes(photos: dict[str, Image.Image], fmt: str, content_type: str) -> None:
    data = _encode(photos["coffee"].resize((64, 48)), fmt)
    upload = to_upload(data)
    assert upload.content_type == content_type and upload.data == data  # sent as it is, not re-encoded
    assert upload.filename.startswith("image.")


def test_paths_keep_their_name_and_unknown_bytes_fall_back(tmp_path: Path) -> None:
    path = tmp_path / "scan.jpeg"
    path.write_bytes(b"not really a jpeg")
    upload = to_upload(path)
    assert (upload.filename, upload.content_type) == ("scan.jpeg", "image/jpeg")  # guessed from the name
    assert to_upload(b"????").content_type == "application/octet-stream"
    assert sniff(b"") is None


def test_pil_images_become_png(photos: dict[str, Image.Image]) -> None:
    rgb = photos["astronaut"].resize((40, 30))
    for image in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("CMYK"), rgb.convert("P")):
        upload = to_upload(image)
        assert upload.content_type == "image/png"
        with Image.open(io.BytesIO(upload.data)) as decoded:
            assert decoded.format == "PNG" and decoded.size == (40, 30)
            if image.mode in ("RGB", "CMYK"):  # CMYK is not a PNG mode: converted to RGB, as the server would
                assert decoded.mode == "RGB"
            if image.mode == "RGB":
                assert np.array_equal(np.asarray(decoded), np.asarray(rgb))  # lossless


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (7, 5, 3), (7, 5, 4)])
def test_arrays_become_png_losslessly(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    upload = to_upload(array)
    with Image.open(io.BytesIO(upload.data)) as decoded:
        assert np.array_equal(np.asarray(decoded), array.reshape(7, 5) if len(shape) == 2 or shape[2] == 1 else array)


def test_arrays_that_are_not_images_are_refused() -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_upload(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="HxW"):
        to_upload(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="HxW"):
        to_upload(np.zeros((2, 4, 4, 3), dtype=np.uint8))


def test_file_objects_are_read(tmp_path: Path) -> None:
    gif = b"GIF89a" + bytes(20)
    assert to_upload(io.BytesIO(gif)) == ("image.gif", gif, "image/gif")
    (tmp_path / "frame.gif").write_bytes(gif)
    with (tmp_path / "frame.gif").open("rb") as f:
        assert to_upload(f).filename == "frame.gif"
