"""Overlay PNGs: size, where the heat map lands on the photo, blending, the colour map and the colour bar."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.core.overlay import colormap, overlay_figure, overlay_panel, overlay_title, percent, render_overlay
from service.errors import InvalidParameter

REC709 = np.array([0.2126, 0.7152, 0.0722])


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ REC709


def find(panel: Image.Image, figure: Image.Image) -> tuple[int, int]:
    """Where the panel sits in the figure (top-left corner), searching the first 100 pixels each way."""
    small, big = np.asarray(panel), np.asarray(figure)
    h, w = panel.height, panel.width
    for y in range(min(100, big.shape[0] - h + 1)):
        for x in range(min(100, big.shape[1] - w + 1)):
            if np.array_equal(big[y : y + h, x : x + w], small):
                return x, y
    raise AssertionError("the panel is not in the figure")


# --- the colour map --------------------------------------------------------------------------------------


def test_colormap_luminance_rises_monotonically() -> None:
    colours = colormap(np.linspace(0.0, 1.0, 256))  # (256, 3)
    assert colours.dtype == np.uint8 and colours.shape == (256, 3)
    assert (np.diff(luminance(colours)) > 0).all()
    assert luminance(colours[0]) < 10 and luminance(colours[-1]) > 230  # near black to near white


def test_colormap_clips_and_treats_nan_as_low() -> None:
    values = np.array([[-1.0, 0.0], [np.nan, 2.0]])
    colours = colormap(values)  # (2, 2, 3)
    assert colours.shape == (2, 2, 3)
    np.testing.assert_array_equal(colours[0, 0], colours[0, 1])
    np.testing.assert_array_equal(colours[1, 0], colours[0, 1])
    np.testing.assert_array_equal(colours[1, 1], colormap(np.array(1.0)))


# --- the PNG and its size --------------------------------------------------------------------------------


def test_render_overlay_is_a_png_within_max_side_plus_decorations() -> None:
    png = render_overlay(photo(1000, 500), np.eye(4), max_side=256, title="rollout · predicted cat (93%)")
    figure = Image.open(io.BytesIO(png))
    assert figure.format == "PNG" and figure.mode == "RGB"
    assert 256 < figure.width <= 256 + 150  # colour bar, labels and margins on the right
    assert 128 < figure.height <= 128 + 100  # title line and margins


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1000, 500), 256, (256, 128)),  # shrunk
        ((451, 300), 512, (451, 300)),  # fits: left alone
        ((32, 32), 512, (512, 512)),  # enlarged x16
        ((30, 20), 512, (510, 340)),  # enlarged x17, aspect kept exactly
        ((200, 600), 300, (100, 300)),  # tall
    ],
)
def test_panel_keeps_the_aspect_ratio_and_caps_the_long_side(
    size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    panel = overlay_panel(photo(*size), np.zeros((2, 2)), max_side=max_side)
    assert panel.size == expected


def test_tiny_images_are_enlarged_with_crisp_pixels() -> None:
    image = photo(16, 16)
    panel = overlay_panel(image, np.zeros((4, 4)), alpha=0.0, max_side=128)
    blocks = np.repeat(np.repeat(np.asarray(image), 8, axis=0), 8, axis=1)  # (128, 128, 3)
    np.testing.assert_array_equal(np.asarray(panel), blocks)


# --- blending --------------------------------------------------------------------------------------------


def test_alpha_zero_leaves_the_box_as_the_resized_photo_and_dims_the_rest() -> None:
    image = photo(300, 200)
    box = (50.0, 0.0, 250.0, 200.0)
    panel = np.asarray(overlay_panel(image, np.ones((4, 4)), box=box, alpha=0.0, max_side=300))
    original = np.asarray(image)
    np.testing.assert_array_equal(panel[:, 50:250], original[:, 50:250])
    assert luminance(panel[:, :49]).mean() < 0.6 * luminance(original[:, :49]).mean()
    assert luminance(panel[:, 251:]).mean() < 0.6 * luminance(original[:, 251:]).mean()


def test_alpha_zero_on_a_shrunk_photo_matches_a_plain_resize() -> None:
    image = Image.fromarray(np.tile(np.linspace(0, 255, 800, dtype=np.uint8), (400, 1))).convert("RGB")
    panel = np.asarray(overlay_panel(image, np.ones((4, 4)), alpha=0.0, max_side=200), dtype=np.float64)
    plain = np.asarray(image.resize((200, 100), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(panel - plain).mean() < 2.0


def test_alpha_one_shows_only_the_colour_map() -> None:
    panel = np.asarray(overlay_panel(photo(64, 64), np.full((3, 3), 0.7), alpha=1.0, max_side=128))
    assert (panel == colormap(np.array(0.7))).all()


def test_alpha_one_with_a_varying_map_uses_only_colour_map_entries() -> None:
    heat = np.random.default_rng(1).random((5, 5))
    panel = np.asarray(overlay_panel(photo(64, 64), heat, alpha=1.0, max_side=128)).reshape(-1, 3)
    table = {tuple(c) for c in colormap(np.linspace(0, 1, 256))}
    assert {tuple(c) for c in panel} <= table


def test_a_hot_top_left_patch_is_hot_in_the_top_left_of_the_box() -> None:
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    panel = np.asarray(overlay_panel(photo(128, 128), heat, alpha=1.0, max_side=128))  # (128, 128, 3)
    light = luminance(panel)  # (128, 128)
    assert light[:32, :32].mean() > 150 > 20 > light[64:, 64:].mean()
    y, x = np.unravel_index(light.argmax(), light.shape)
    assert y < 32 and x < 32
    assert light[16, 16] > luminance(colormap(np.array(0.95)))  # the patch centre is near the top colour


def test_the_box_places_the_map_on_a_non_square_photo() -> None:
    # A 600x400 photo centre-cropped to 400x400 (shortest edge), drawn at half size.
    heat = np.zeros((4, 4))
    heat[:, -1] = 1.0  # the right-hand column of patches
    panel = np.asarray(
        overlay_panel(photo(600, 400), heat, box=(100, 0, 500, 400), alpha=1.0, max_side=300)
    )  # (200, 300, 3); the box is columns 50..249
    hot = colormap(np.array(1.0))
    table = {tuple(c) for c in colormap(np.linspace(0, 1, 256))}
    assert {tuple(c) for c in panel[:, 50:250].reshape(-1, 3)} <= table
    assert (panel[:, 235:250] == hot).all()  # the right edge of the box is hot
    assert not (panel[:, 251:] == hot).all(axis=-1).any()  # nothing hot outside the box
    assert luminance(panel[:, 50:60]).mean() < 20  # the left edge of the box is cold


def test_a_box_reaching_past_the_photo_is_clipped() -> None:
    panel = overlay_panel(photo(100, 100), np.ones((2, 2)), box=(-20, -20, 120, 120), alpha=1.0, max_side=100)
    assert (np.asarray(panel) == colormap(np.array(1.0))).all()


def test_transparency_is_flattened_onto_white() -> None:
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    panel = overlay_panel(clear, np.zeros((2, 2)), alpha=0.0, max_side=64)
    assert (np.asarray(panel) == 255).all()


# --- the figure: colour bar and title --------------------------------------------------------------------


def test_figure_has_the_panel_and_a_colour_bar_from_high_to_low() -> None:
    image, heat = photo(120, 80), np.random.default_rng(2).random((3, 3))
    panel = overlay_panel(image, heat, max_side=240)
    figure = overlay_figure(image, heat, max_side=240, title="cls · predicted 7 (99%)")
    x0, y0 = find(panel, figure)
    pixels = np.asarray(figure)
    top, bottom = pixels[y0], pixels[y0 + panel.height - 1]  # (W, 3) rows level with the panel's edges
    bar_columns = [
        x
        for x in range(x0 + panel.width, figure.width)
        if (top[x] == colormap(np.array(1.0))).all() and (bottom[x] == colormap(np.array(0.0))).all()
    ]
    assert len(bar_columns) >= 8, "expected a colour bar at least 8 pixels wide right of the panel"
    assert (luminance(pixels[:y0]) < 100).any(), "the title should be drawn above the panel"


@pytest.mark.parametrize(
    ("method", "layer", "head", "label", "probability", "title"),
    [
        ("rollout", None, None, "0", 0.3142, "rollout · predicted 0 (31%)"),
        ("layer", -1, 2, "7", 0.875, "layer -1 · head 2 · predicted 7 (88%)"),
        ("cls", None, None, "golden retriever", 1.0, "cls · predicted golden retriever (100%)"),
    ],
)
def test_the_title_says_the_map_and_the_prediction_with_its_probability(
    method: str, layer: int | None, head: int | None, label: str, probability: float, title: str
) -> None:
    assert overlay_title(method, layer=layer, head=head, label=label, probability=probability) == title


def test_the_served_overlay_is_titled_by_overlay_title() -> None:
    from service.core.pipeline import describe
    from service.core.schemas import AttentionParams, Prediction

    top = Prediction(label="4", index=4, probability=0.912)
    assert describe("layer", AttentionParams(layer=3, head=0), top) == "layer 3 · head 0 · predicted 4 (91%)"
    assert describe("rollout", AttentionParams(), top) == "rollout · predicted 4 (91%)"


@pytest.mark.parametrize(
    ("probability", "text"),
    [(0.0, "0%"), (0.004, "<1%"), (0.005, "<1%"), (0.31, "31%"), (0.994, "99%"), (0.9951, ">99%"), (1.0, "100%")],
)
def test_percent_never_rounds_to_certainty(probability: float, text: str) -> None:
    assert percent(probability) == text


def test_long_titles_are_cut_to_fit() -> None:
    figure = overlay_figure(photo(64, 64), np.zeros((2, 2)), max_side=64, title="a very long title " * 20)
    assert figure.width < 64 + 150


# --- arguments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_invalid(alpha: float) -> None:
    with pytest.raises(InvalidParameter, match="alpha"):
        render_overlay(photo(32, 32), np.zeros((2, 2)), alpha=alpha)


@pytest.mark.parametrize("max_side", [10, 100_000])
def test_max_side_out_of_range_is_invalid(max_side: int) -> None:
    with pytest.raises(InvalidParameter, match="max_side"):
        render_overlay(photo(32, 32), np.zeros((2, 2)), max_side=max_side)


@pytest.mark.parametrize(
    ("heatmap", "box", "match"),
    [
        (np.zeros(4), None, "heatmap must be"),
        (np.full((2, 2), np.nan), None, "NaN"),
        (np.zeros((2, 2)), (10, 10, 5, 20), "box"),
    ],
)
def test_bad_heatmap_or_box_is_a_server_fault(
    heatmap: np.ndarray, box: tuple[float, float, float, float] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        render_overlay(photo(32, 32), heatmap, box=box)
