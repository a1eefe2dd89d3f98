"""vit_artifact.preprocessing against the frameworks it stands in for, on scikit-image's sample photos.

The reference processors are built locally (no hub): transformers' ViT and DeiT image processors and timm's
eval transform for a random-init model. Parity is checked twice: on [0, 1]-scale pixels before normalisation,
where the bound is one step of 1/255, and on the normalised tensors the model receives.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vit_artifact.metadata import Interpolation, Preprocessing
from vit_artifact.preprocessing import crop_box, preprocess, preprocess_batch, resize_and_crop, to_tensor

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

STEP = 1 / 255  # one uint8 step on the [0, 1] scale
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_TO_NAME: dict[Image.Resampling, Interpolation] = {
    Image.Resampling.NEAREST: "nearest",
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",
    Image.Resampling.LANCZOS: "lanczos",
}


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """Square, landscape 3:2 and 451x300, and a portrait (rocket turned on its side)."""
    names = ("astronaut", "chelsea", "coffee", "rocket")
    images = {name: Image.fromarray(getattr(skimage.data, name)()) for name in names}
    images["rocket_portrait"] = images["rocket"].transpose(Image.Transpose.TRANSPOSE)
    return images


# -- reference processors and the specs that describe them ---------------------------------------------------


def hf_processor(name: str, backend: str, **kwargs: Any) -> Any:
    """`ViTImageProcessor` etc. for backend "pil" (the slow one) or "torchvision" (the fast one).

    transformers 5 names them XImageProcessorPil / XImageProcessor; 4.x named them XImageProcessor / ...Fast.
    """
    if hasattr(transformers, f"{name}Pil"):
        cls = getattr(transformers, f"{name}Pil" if backend == "pil" else name)
    else:
        cls = getattr(transformers, name if backend == "pil" else f"{name}Fast")
    return cls(**kwargs)


def spec_from_hf(processor: Any) -> Preprocessing:
    """What the export would write for a ViT/DeiT processor: they squash to `size`, then optionally crop."""
    size = (processor.size["height"], processor.size["width"])
    crop = (processor.crop_size["height"], processor.crop_size["width"]) if processor.do_center_crop else size
    return Preprocessing(
        resize="squash",
        resize_size=size,
        crop_size=crop,
        interpolation=PIL_TO_NAME[Image.Resampling(processor.resample)],
        rescale_factor=processor.rescale_factor,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
    )


def hf_pixels(processor: Any, image: Image.Image) -> np.ndarray:
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])


@pytest.fixture(scope="module")
def timm_model() -> Any:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False)


def timm_config(model: Any, **overrides: Any) -> dict[str, Any]:
    return timm.data.resolve_data_config(overrides, model=model)


def spec_from_timm(config: dict[str, Any]) -> Preprocessing:
    """timm's eval transform: Resize(floor(size / crop_pct)) on the shorter side, then CenterCrop(size)."""
    _, height, width = config["input_size"]
    assert height == width and config["crop_mode"] == "center", "only square centre crops map to a spec"
    scale = math.floor(height / config["crop_pct"])
    return Preprocessing(
        resize="shortest_edge",
        resize_size=(scale, scale),
        crop_size=(height, width),
        interpolation=config["interpolation"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


def timm_transforms(config: dict[str, Any]) -> tuple[Any, Any]:
    """(full transform, transform without Normalize): the second gives timm's [0, 1] pixels."""
    full = timm.data.create_transform(**config)
    assert type(full.transforms[-1]).__name__ == "Normalize", full
    return full, type(full)(full.transforms[:-1])


def pixels01(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Our resized and cropped image as (3, H, W) floats on the [0, 1] scale."""
    return np.asarray(resize_and_crop(image, spec), dtype=np.float32).transpose(2, 0, 1) / 255


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# -- transformers --------------------------------------------------------------------------------------------

HF_CASES = {
    "vit-default": ("ViTImageProcessor", {}),
    "vit-160x192-bicubic-imagenet": (
        "ViTImageProcessor",
        {
            "size": {"height": 160, "width": 192},
            "resample": 3,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
        },
    ),
    "deit-default": ("DeiTImageProcessor", {}),
    # (256 - 221) and (256 - 229) are odd: transformers floors the offset where torchvision would round it up.
    "deit-odd-crop-bilinear": (
        "DeiTImageProcessor",
        {"crop_size": {"height": 221, "width": 229}, "resample": 2, "image_mean": IMAGENET_MEAN},
    ),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_matches_transformers_slow_processor(case: str, photos: dict[str, Image.Image]) -> None:
    name, kwargs = HF_CASES[case]
    processor = hf_processor(name, "pil", **kwargs)
    unnormalised = hf_processor(name, "pil", do_normalize=False, **kwargs)
    spec = spec_from_hf(processor)
    for photo, image in photos.items():
        # The same Pillow resize and the same crop arithmetic: identical pixels, not merely close ones.
        assert max_diff(pixels01(image, spec), hf_pixels(unnormalised, image)) < 1e-6, (case, photo)
        # Measured: bit-identical tensors; the bound leaves room for float32 reordering elsewhere.
        assert max_diff(preprocess(image, spec), hf_pixels(processor, image)) < 1e-6, (case, photo)


@pytest.mark.parametrize("name", ["ViTImageProcessor", "DeiTImageProcessor"])
def test_matches_transformers_fast_processor_closely(name: str, photos: dict[str, Image.Image]) -> None:
    """The torchvision-backed processor resamples uint8 tensors with torch's antialiased kernels, not Pillow.

    Measured (transformers 5.24, torchvision 0.29, on the four photos and the portrait), in steps of 1/255:
    ViT (bilinear 224): max 1, mean 0 (astronaut) to 0.002 on the landscape photos, 0.10 on the portrait;
    DeiT (bicubic 256, crop 224): max 1 on the landscape photos, mean <= 0.004; portrait max 3, mean 0.10.
    The portrait is the outlier: about 1 value in 10 is one step off there, against 1 in 500 elsewhere.
    """
    slow = hf_processor(name, "pil", do_normalize=False)
    fast = hf_processor(name, "torchvision", do_normalize=False)
    spec = spec_from_hf(slow)
    for photo, image in photos.items():
        diff = np.abs(pixels01(image, spec) - hf_pixels(fast, image))
        assert diff.max() <= 4 * STEP, photo
        assert diff.mean() < 0.2 * STEP, photo


# -- timm ----------------------------------------------------------------------------------------------------

TIMM_CASES: dict[str, dict[str, Any]] = {
    "vit-tiny-default": {},  # bicubic, crop_pct 0.9 (resize 248), mean/std 0.5
    "bilinear-0.875-imagenet": {
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    "no-crop": {"crop_pct": 1.0},
    # resize 235: 235 - 224 = 11, so torchvision's round(5.5) = 6 and a floor would give 5
    "crop-0.95-odd-offset": {"crop_pct": 0.95},
    "input-192-lanczos": {"input_size": (3, 192, 192), "interpolation": "lanczos"},
    # resize 203 < crop 224: torchvision pads with black before cropping
    "crop-larger-than-resize": {"crop_pct": 1.1, "interpolation": "bilinear"},
}


@pytest.mark.parametrize("case", TIMM_CASES)
def test_matches_timm_eval_transform(case: str, photos: dict[str, Image.Image], timm_model: Any) -> None:
    config = timm_config(timm_model, **TIMM_CASES[case])
    spec = spec_from_timm(config)
    full, unnormalised = timm_transforms(config)
    for photo, image in photos.items():
        assert max_diff(pixels01(image, spec), unnormalised(image).numpy()) < 1e-6, (case, photo)
        # Measured: bit-identical tensors here too (torch's float32 x / 255 rounds like our float64 product).
        assert max_diff(preprocess(image, spec), full(image).numpy()) < 1e-6, (case, photo)


def test_extreme_aspect_ratio_is_close_to_timm(timm_model: Any) -> None:
    """Past 16x the crop's pixels only the crop window is resampled; Pillow's float box moves values a bit."""
    config = timm_config(timm_model)
    spec = spec_from_timm(config)
    _, unnormalised = timm_transforms(config)
    strip = Image.fromarray(skimage.data.astronaut()).resize((30, 600))  # resized to 248x4960, 24.5x the crop
    ours, theirs = pixels01(strip, spec), unnormalised(strip).numpy()
    # Measured (bicubic and bilinear, 30x600 and 10x1000 strips): at most 2 steps, 0.16 steps on average.
    assert max_diff(ours, theirs) <= 4 * STEP
    assert float(np.abs(ours - theirs).mean()) < 0.25 * STEP


# -- crop offsets: the rule the exporter records for its framework -------------------------------------------

# Sizes where floor and round disagree, on every photo's short side: (resized - crop) % 4 == 3.
ODD_OFFSET_SHORTEST_EDGES = (227, 231, 259)


@pytest.mark.parametrize("shortest_edge", ODD_OFFSET_SHORTEST_EDGES)
def test_transformers_shortest_edge_crop_floors_as_the_exporter_records(
    shortest_edge: int, photos: dict[str, Image.Image]
) -> None:
    """A transformers processor that resizes the shortest edge, then crops: its offset is floored."""
    from model_export.from_hf import processor_preprocessing

    kwargs = {"size": {"shortest_edge": shortest_edge}, "crop_size": {"height": 224, "width": 224}}
    processor = hf_processor("DeiTImageProcessor", "pil", **kwargs)
    spec = processor_preprocessing(processor, where="test")
    assert (spec.resize, spec.crop_offset) == ("shortest_edge", "floor")
    rounded = spec.model_copy(update={"crop_offset": "round"})
    for photo, image in photos.items():
        reference = hf_pixels(processor, image)
        assert max_diff(preprocess(image, spec), reference) < 1e-6, (shortest_edge, photo)
        assert max_diff(preprocess(image, rounded), reference) > 0.1, "the sizes must be ones where the rules differ"


@pytest.mark.parametrize("crop_pct", [0.95, 0.9, 0.97])  # resize 235, 248, 230: offsets 5.5, 12, 3
def test_timm_crop_rounds_as_the_exporter_records(
    crop_pct: float, photos: dict[str, Image.Image], timm_model: Any
) -> None:
    from model_export.from_timm import _preprocessing

    config = timm_config(timm_model, crop_pct=crop_pct)
    spec = _preprocessing("vit_tiny_patch16_224", timm_model, (224, 224)).model_copy(
        update={"resize_size": spec_from_timm(config).resize_size}
    )
    assert spec.crop_offset == "round"
    full, _ = timm_transforms(config)
    for photo, image in photos.items():
        assert max_diff(preprocess(image, spec), full(image).numpy()) < 1e-6, (crop_pct, photo)


def test_a_record_without_crop_offset_keeps_the_rule_its_resize_implied() -> None:
    """Artifacts written before the field existed load, and crop where they always did."""
    old = {"resize_size": [259, 259], "crop_size": [224, 224], "interpolation": "bilinear"}
    old |= {"mean": [0.5] * 3, "std": [0.5] * 3}
    squash = Preprocessing.model_validate({**old, "resize": "squash"})
    shortest = Preprocessing.model_validate({**old, "resize": "shortest_edge"})
    assert squash.crop_offset == "floor"
    assert shortest.crop_offset == "round"
    # 259 - 224 = 35: floor 17, round(17.5) = 18
    assert crop_box((259, 259), squash)[0] == 17
    assert crop_box((259, 259), shortest)[0] == 18
    assert crop_box((259, 259), shortest.model_copy(update={"crop_offset": "floor"}))[0] == 17


# -- crop_box ------------------------------------------------------------------------------------------------


def spec(resize: Literal["squash", "shortest_edge"], resize_size: int, crop: int, **kwargs: Any) -> Preprocessing:
    return Preprocessing(
        resize=resize,
        resize_size=(resize_size, resize_size),
        crop_size=(crop, crop),
        interpolation=kwargs.pop("interpolation", "bilinear"),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        **kwargs,
    )


def test_crop_box_shortest_edge() -> None:
    # 640x480 -> 341x256 (int(256 * 640 / 480) = 341); offsets round(58.5) = 58 (half to even) and 16
    box = crop_box((640, 480), spec("shortest_edge", 256, 224))
    assert box == pytest.approx((58 * 640 / 341, 30.0, 282 * 640 / 341, 450.0))


def test_crop_box_squash() -> None:
    # 640x480 -> 256x256, offsets 16: scale back by 640/256 and 480/256
    assert crop_box((640, 480), spec("squash", 256, 224)) == pytest.approx((40.0, 30.0, 600.0, 450.0))


def test_crop_box_without_crop_is_the_whole_image() -> None:
    assert crop_box((451, 300), spec("squash", 224, 224)) == (0.0, 0.0, 451.0, 300.0)


def test_crop_box_in_original_coordinates() -> None:
    s = spec("shortest_edge", 256, 224)
    reduced = crop_box((500, 375), s)
    assert crop_box((500, 375), s, original_size=(2000, 1500)) == pytest.approx([4 * v for v in reduced])


@pytest.mark.parametrize("s", [spec("shortest_edge", 248, 224), spec("squash", 256, 224)], ids=["shortest", "squash"])
def test_crop_box_is_the_region_the_model_sees(s: Preprocessing, photos: dict[str, Image.Image]) -> None:
    """Resampling the original's crop_box straight to the input size reproduces the preprocessed image."""
    for photo, image in photos.items():
        direct = image.resize(s.crop_size[::-1], Image.Resampling.BILINEAR, box=crop_box(image.size, s))
        diff = np.abs(np.asarray(direct, np.int16) - np.asarray(resize_and_crop(image, s), np.int16))
        # Only Pillow's float32 box rounding differs. Measured: at most 1 step, 0.07 steps on average.
        assert diff.max() <= 1 and diff.mean() < 0.1, photo


# -- tensors, batches, odd inputs ----------------------------------------------------------------------------


def test_to_tensor_arithmetic_and_channel_order() -> None:
    image = Image.new("RGB", (4, 2), (10, 128, 250))
    rgb = Preprocessing(
        resize="squash", resize_size=(2, 4), crop_size=(2, 4), interpolation="bilinear",
        rescale_factor=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125),
    )  # fmt: skip
    tensor = to_tensor(image, rgb)
    assert tensor.dtype == np.float32 and tensor.shape == (3, 2, 4) and tensor.flags.c_contiguous
    expected = [(10 / 255 - 0.1) / 0.5, (128 / 255 - 0.2) / 0.25, (250 / 255 - 0.3) / 0.125]
    np.testing.assert_allclose(tensor[:, 0, 0], expected, rtol=1e-6)
    bgr = to_tensor(image, rgb.model_copy(update={"channel_order": "BGR"}))
    np.testing.assert_array_equal(bgr, tensor[::-1])


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_to_tensor_is_the_framework_arithmetic_bit_for_bit(order: str) -> None:
    """The lookup table gives exactly what the five-pass numpy arithmetic gave, for every uint8 value."""
    s = Preprocessing(
        resize="squash", resize_size=(16, 48), crop_size=(16, 48), interpolation="bilinear",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, channel_order=order,
    )  # fmt: skip
    values = np.arange(256 * 3, dtype=np.uint16).reshape(16, 48) % 256
    pixels = np.stack([values, values[::-1], values.T.reshape(16, 48)], axis=-1).astype(np.uint8)  # (H, W, 3)
    rescaled = (pixels.astype(np.float64) * s.rescale_factor).astype(np.float32)
    expected = ((rescaled - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
    if order == "BGR":
        expected = expected[::-1]
    np.testing.assert_array_equal(to_tensor(Image.fromarray(pixels), s), expected)
    out = np.full((3, 16, 48), np.nan, dtype=np.float32)
    assert to_tensor(Image.fromarray(pixels), s, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_preprocess_batch(photos: dict[str, Image.Image]) -> None:
    s = spec("shortest_edge", 248, 224, interpolation="bicubic")
    images = list(photos.values())
    batch = preprocess_batch(images, s)
    assert batch.shape == (len(images), 3, 224, 224) and batch.dtype == np.float32
    for row, image in zip(batch, images, strict=True):
        np.testing.assert_array_equal(row, preprocess(image, s))
    assert preprocess_batch([], s).shape == (0, 3, 224, 224)


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1), (2, 3), (225, 224)])
@pytest.mark.parametrize(
    "s",
    [
        spec("shortest_edge", 248, 224),
        spec("squash", 256, 224),
        spec("shortest_edge", 200, 224, interpolation="nearest"),
    ],
    ids=["shortest", "squash", "padded-nearest"],
)
def test_tiny_and_thin_images(size: tuple[int, int], s: Preprocessing) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tensor = preprocess(image, s)
    assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()
    left, top, right, bottom = crop_box(size, s)
    assert right > left and bottom > top


def test_a_needle_image_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """1x40000 under "shortest_edge" would be a 248x9920000 intermediate if the whole image were resized."""
    needle = Image.new("RGB", (1, 40_000), (200, 100, 50))
    made: list[tuple[int, int]] = []  # the size of every image Pillow resized to
    resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda im, size, *a, **k: made.append(tuple(size)) or resize(im, size, *a, **k)
    )
    out = resize_and_crop(needle, spec("shortest_edge", 248, 224))
    assert made and all(w * h <= 248 * 248 for w, h in made), made  # only the crop's window was resampled
    assert out.size == (224, 224) and out.getpixel((100, 100)) == (200, 100, 50)


def test_refuses_non_rgb_images() -> None:
    with pytest.raises(ValueError, match="expected an RGB image, got mode RGBA"):
        preprocess(Image.new("RGBA", (8, 8)), spec("squash", 8, 8))
