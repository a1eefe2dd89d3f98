"""Decode + preprocess cost per image: Pillow (full decode, and with `draft`: libjpeg's DCT-domain scaling, what
the service does) against libjpeg-turbo through simplejpeg and OpenCV's decoder (full and `IMREAD_REDUCED_*`),
on scikit-image's photos as a ~640 px and a ~4 MP JPEG and PNG.

    PYTHONPATH=. python benchmarks/decode.py [--repeats 30]

simplejpeg and opencv-python-headless are optional (a variant whose library is missing is left out); install
them into a scratch directory with `pip install --target DIR simplejpeg opencv-python-headless` and add DIR to
PYTHONPATH. PyTurboJPEG 2.x (the only versions on PyPI) needs a system libjpeg-turbo >= 3.0, which Debian 12
does not ship (2.1.5), so it is not measured.

Every variant ends in the same model input: the decoded pixels go through `vit_artifact.preprocessing` for three
records: timm's ViT eval transform (shortest edge 248, bicubic, crop 224), the Hugging Face style 256/224 bilinear
one, and the default model's 32x32. Variants run interleaved (each repeat visits every variant, in a rotating
order) and the medians are compared, so machine noise hits them alike: compare ratios, not absolute numbers
across runs. Pixel differences are in uint8 steps of the resized and cropped image (the model input differs by
steps / 255 / std), against today's path and against Pillow's full decode.

The last section measures what the draft costs in fidelity (issue 12 item 4): max and mean |draft - full| of the
model input on every photo, for each record. Writes benchmarks/results/decode.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import skimage.data
from PIL import Image, ImageOps

from service.core.imaging import decode_image
from vit_artifact.metadata import Preprocessing, read_metadata
from vit_artifact.preprocessing import preprocess, resize_and_crop, to_tensor

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "digits-vit"
MAX_PIXELS = 40_000_000
QUALITY = 90  # Pillow's default 4:2:0 chroma subsampling, as cameras and phones write

try:
    import simplejpeg
except ImportError:
    simplejpeg = None
try:
    import cv2
except ImportError:
    cv2 = None


# -- images ----------------------------------------------------------------------------------------------------


def photo(name: str) -> Image.Image:
    pixels = getattr(skimage.data, name)()
    return Image.fromarray(pixels[0] if isinstance(pixels, tuple) else pixels).convert("RGB")  # stereo: left


def mosaic(width: int = 2448, height: int = 1632) -> Image.Image:
    """~4 MP of photo detail: a 4x4 grid of eight sample photos, each fitted near its native scale (an upscaled
    640 px photo would be smooth, and cheaper to entropy-decode than a camera's 4 MP)."""
    names = ("rocket", "coffee", "stereo_motorcycle", "hubble_deep_field", "retina", "astronaut", "chelsea")
    names += ("immunohistochemistry",)
    tile = (width // 4, height // 4)
    canvas = Image.new("RGB", (width, height))
    for i in range(16):
        fitted = ImageOps.fit(photo(names[i % len(names)]), tile, Image.Resampling.LANCZOS)
        canvas.paste(fitted, ((i % 4) * tile[0], (i // 4) * tile[1]))
    return canvas


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": QUALITY} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def timed_images() -> dict[str, bytes]:
    rocket, big = photo("rocket"), mosaic()  # rocket: a 640x427 photo, as a phone shares one
    return {
        f"JPEG {rocket.width}x{rocket.height}": encode(rocket, "JPEG"),
        f"JPEG {big.width}x{big.height} (4 MP)": encode(big, "JPEG"),
        f"PNG {rocket.width}x{rocket.height}": encode(rocket, "PNG"),
        f"PNG {big.width}x{big.height} (4 MP)": encode(big, "PNG"),
    }


def fidelity_images() -> dict[str, bytes]:
    """JPEGs the draft reduces for a 248 or 256 px resize (>= 2x on both sides), plus the ones it reduces for 32."""
    images = {name: photo(name) for name in ("astronaut", "hubble_deep_field", "retina", "rocket", "coffee")}
    images["mosaic 4 MP"] = mosaic()
    return {f"{name} {im.width}x{im.height}": encode(im, "JPEG") for name, im in images.items()}


def specs() -> dict[str, Preprocessing]:
    return {
        "timm 248/224 bicubic": Preprocessing(
            resize="shortest_edge",
            resize_size=(248, 248),
            crop_size=(224, 224),
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        "HF 256/224 bilinear": Preprocessing(
            resize="shortest_edge",
            resize_size=(256, 256),
            crop_size=(224, 224),
            interpolation="bilinear",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            crop_offset="floor",
        ),
        "default model 32x32": read_metadata(DEFAULT_MODEL, verify_hashes=False).preprocessing,
    }


# -- decoders: bytes -> upright RGB image ----------------------------------------------------------------------


def draft_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The reduction Pillow's `draft` picks for a (height, width) target: 8, 4, 2 or 1 (Pillow's JpegImagePlugin)."""
    scale = min(size[0] // target[1], size[1] // target[0])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def pillow_full(data: bytes, spec: Preprocessing) -> Image.Image:
    return decode_image(data, max_pixels=MAX_PIXELS)


def pillow_draft(data: bytes, spec: Preprocessing) -> Image.Image:
    return decode_image(data, max_pixels=MAX_PIXELS, target_size=spec.resize_size)


def simplejpeg_full(data: bytes, spec: Preprocessing) -> Image.Image:
    return Image.fromarray(simplejpeg.decode_jpeg(data, "RGB"))


def simplejpeg_pow2(data: bytes, spec: Preprocessing) -> Image.Image:
    """The reduction Pillow's draft takes (1/2, 1/4, 1/8), so pixels can match today's."""
    width, height = simplejpeg.decode_jpeg_header(data)[:2][::-1]
    scale = draft_scale((width, height), spec.resize_size)
    minimum = {"min_width": -(-width // scale), "min_height": -(-height // scale)}
    return Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", **minimum))


def simplejpeg_m8(data: bytes, spec: Preprocessing) -> Image.Image:
    """libjpeg-turbo's own M/8 choice: the smallest scale >= the target on both sides (3/8, 5/8... too)."""
    height, width = spec.resize_size
    return Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width))


def opencv_full(data: bytes, spec: Preprocessing) -> Image.Image:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def opencv_reduced(data: bytes, spec: Preprocessing) -> Image.Image:
    with Image.open(io.BytesIO(data)) as header:  # OpenCV has no header-only read; Pillow's costs ~0.1 ms
        scale = draft_scale(header.size, spec.resize_size)
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag.get(scale, cv2.IMREAD_REDUCED_COLOR_8))
    return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@dataclass(frozen=True)
class Variant:
    name: str
    decode: Callable[[bytes, Preprocessing], Image.Image]
    formats: tuple[str, ...]
    library: object = True  # None: not installed


TODAY = "Pillow + draft (today)"
FULL = "Pillow full decode"
VARIANTS = (
    Variant(TODAY, pillow_draft, ("JPEG", "PNG")),
    Variant(FULL, pillow_full, ("JPEG",)),
    Variant("simplejpeg full", simplejpeg_full, ("JPEG",), simplejpeg),
    Variant("simplejpeg 1/2,1/4,1/8 (as draft)", simplejpeg_pow2, ("JPEG",), simplejpeg),
    Variant("simplejpeg M/8 (its own choice)", simplejpeg_m8, ("JPEG",), simplejpeg),
    Variant("OpenCV full", opencv_full, ("JPEG", "PNG"), cv2),
    Variant("OpenCV IMREAD_REDUCED (as draft)", opencv_reduced, ("JPEG",), cv2),
)


def to_tensor_unfused(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """What `to_tensor` did before it became one table lookup per channel: the reference for the fusion's gain."""
    pixels = (np.asarray(image, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
    tensor = ((pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1)
    return np.ascontiguousarray(tensor[::-1] if spec.channel_order == "BGR" else tensor)


# -- measurement -----------------------------------------------------------------------------------------------


def steps(a: Image.Image, b: Image.Image) -> tuple[int, float]:
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return int(diff.max()), float(diff.mean())


def measure_decoding(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for image_name, data in timed_images().items():
        fmt = image_name.split()[0]
        for spec_name, spec in specs().items():
            variants = [v for v in VARIANTS if fmt in v.formats and v.library is not None]
            crops = {v.name: resize_and_crop(v.decode(data, spec), spec) for v in variants}  # also a warm-up
            decode_s: dict[str, list[float]] = {v.name: [] for v in variants}
            total_s: dict[str, list[float]] = {v.name: [] for v in variants}
            for r in range(repeats):
                for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                    t0 = time.perf_counter()
                    image = v.decode(data, spec)
                    t1 = time.perf_counter()
                    preprocess(image, spec)
                    t2 = time.perf_counter()
                    decode_s[v.name].append(t1 - t0)
                    total_s[v.name].append(t2 - t0)
            base = statistics.median(total_s[TODAY])
            for v in variants:
                total = statistics.median(total_s[v.name])
                vs_today, vs_full = (
                    steps(crops[v.name], crops[TODAY]),
                    steps(crops[v.name], crops.get(FULL, crops[TODAY])),
                )
                rows.append(
                    {
                        "image": image_name,
                        "bytes": len(data),
                        "preprocessing": spec_name,
                        "variant": v.name,
                        "decode_ms": round(statistics.median(decode_s[v.name]) * 1e3, 2),
                        "total_ms": round(total * 1e3, 2),
                        "speedup_vs_today": round(base / total, 2),
                        "max_steps_vs_today": vs_today[0],
                        "mean_steps_vs_today": round(vs_today[1], 3),
                        "max_steps_vs_full": vs_full[0],
                        "mean_steps_vs_full": round(vs_full[1], 3),
                    }
                )
    return rows


def measure_to_tensor(repeats: int) -> list[dict[str, Any]]:
    image = decode_image(encode(photo("rocket"), "JPEG"), max_pixels=MAX_PIXELS)
    rows = []
    for spec_name, spec in specs().items():
        crop = resize_and_crop(image, spec)
        assert np.array_equal(to_tensor(crop, spec), to_tensor_unfused(crop, spec)), "the fusion must be exact"
        times: dict[str, list[float]] = {"unfused": [], "fused": [], "resize+crop": []}
        for _ in range(repeats * 10):  # cheap calls: more repeats for a stable median
            for name, fn in (("unfused", to_tensor_unfused), ("fused", to_tensor)):
                t0 = time.perf_counter()
                fn(crop, spec)
                times[name].append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            resize_and_crop(image, spec)
            times["resize+crop"].append(time.perf_counter() - t0)
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append(
            {
                "preprocessing": spec_name,
                "resize_crop_ms_640": round(median["resize+crop"], 3),
                "to_tensor_unfused_ms": round(median["unfused"], 3),
                "to_tensor_fused_ms": round(median["fused"], 3),
                "to_tensor_speedup": round(median["unfused"] / median["fused"], 2),
            }
        )
    return rows


def measure_fidelity() -> list[dict[str, Any]]:
    """|model input with draft - with full decode|, in steps of 1/255 on the [0, 1] scale (before mean/std)."""
    rows = []
    for image_name, data in fidelity_images().items():
        full = decode_image(data, max_pixels=MAX_PIXELS)
        for spec_name, spec in specs().items():
            drafted = decode_image(data, max_pixels=MAX_PIXELS, target_size=spec.resize_size)
            a, b = resize_and_crop(full, spec), resize_and_crop(drafted, spec)
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
            rows.append(
                {
                    "image": image_name,
                    "preprocessing": spec_name,
                    "draft_scale": round(full.width / drafted.width),
                    "max_steps": int(diff.max()),
                    "mean_steps": round(float(diff.mean()), 3),
                    "p99_steps": float(np.percentile(diff, 99)),
                }
            )
    return rows


# -- report ----------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Decode + preprocess per image",
        "",
        f"Median of {result['repeats']} interleaved repeats per point, one process, {result['machine']}. "
        "Ratio: today's time / the variant's (higher is faster). Pixel differences: uint8 steps of the resized "
        "and cropped image, max / mean.",
        "",
        "| image | preprocessing | variant | decode ms | total ms | speedup vs today | vs today max/mean "
        "| vs full decode max/mean |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["decoding"]:
        lines.append(
            f"| {r['image']} | {r['preprocessing']} | {r['variant']} | {r['decode_ms']:.2f} | {r['total_ms']:.2f} "
            f"| {r['speedup_vs_today']:.2f}x | {r['max_steps_vs_today']} / {r['mean_steps_vs_today']:.3f} "
            f"| {r['max_steps_vs_full']} / {r['mean_steps_vs_full']:.3f} |"
        )
    lines += [
        "",
        "## Rescale + normalize + channels-first: five numpy passes against one lookup per channel (exact)",
        "",
        "| preprocessing | resize+crop of the 640 px photo, ms | to_tensor before, ms | after, ms | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["to_tensor"]:
        lines.append(
            f"| {r['preprocessing']} | {r['resize_crop_ms_640']:.3f} | {r['to_tensor_unfused_ms']:.3f} "
            f"| {r['to_tensor_fused_ms']:.3f} | {r['to_tensor_speedup']:.2f}x |"
        )
    lines += [
        "",
        "## What the draft (DCT-domain scaling) moves in the model input",
        "",
        "|draft - full decode|, steps of 1/255 before mean/std (divide by std for the normalised input); "
        f"JPEG quality {QUALITY}.",
        "",
        "| image | preprocessing | draft scale | max | p99 | mean |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["fidelity"]:
        lines.append(
            f"| {r['image']} | {r['preprocessing']} | 1/{r['draft_scale']} | {r['max_steps']} "
            f"| {r['p99_steps']:.0f} | {r['mean_steps']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    versions = {"Pillow": PIL.__version__, "numpy": np.__version__}
    if simplejpeg is not None:
        versions["simplejpeg"] = simplejpeg.__version__
    if cv2 is not None:
        versions["opencv"] = cv2.__version__
    result = {
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "decoding": measure_decoding(args.repeats),
        "to_tensor": measure_to_tensor(args.repeats),
        "fidelity": measure_fidelity(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (RESULTS / "decode.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
