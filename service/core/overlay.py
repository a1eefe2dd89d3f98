"""Attention maps drawn over the user's photo, as a PNG a person can read.

The heat map (from `vit_artifact.attention`, e.g. attention rollout, Abnar & Zuidema 2020, arXiv:2005.00928)
covers the model input, which is only part of the photo when preprocessing centre-crops. So the caller gives
the photo and the `box` the input was cut from; the map is upsampled smoothly (bicubic) onto that box and
blended with a perceptual colour map, the rest of the photo is dimmed, and a colour bar (low to high) and an
optional title are drawn beside it. Pillow and numpy only.

Sizing: the long side of the photo is shrunk to `max_side` (Lanczos), or enlarged by the largest whole factor
that fits (nearest neighbour, so a 32x32 digit stays crisp instead of blurring). The colour bar, labels,
margins and title add a little around that.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.errors import InvalidParameter

Box = tuple[float, float, float, float]
_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

# Inferno (perceptually uniform, luminance rises monotonically, readable in greyscale and by most colour-blind
# viewers): eight evenly spaced anchor colours, linearly interpolated into a 256-entry table. An approximation
# of matplotlib's inferno, within about 25/255 per channel.
_INFERNO_ANCHORS = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)  # (8, 3)

MIN_SIDE, MAX_SIDE = 64, 2048
# Outside the box the photo is greyed and darkened, and a thin line is drawn just outside the box's edge
# (never over the box), so the region the model saw stands out.
_DIM = 0.4
_DESATURATE = 0.6
_OUTLINE = (235, 235, 235)
_BACKGROUND = (255, 255, 255)
_INK = (33, 33, 33)
_FRAME = (160, 160, 160)


def _build_lut(anchors: np.ndarray, size: int = 256) -> np.ndarray:
    positions = np.linspace(0.0, 1.0, len(anchors))  # (K,)
    samples = np.linspace(0.0, 1.0, size)  # (size,)
    channels = [np.interp(samples, positions, anchors[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)  # (size, 3)


INFERNO_LUT = _build_lut(_INFERNO_ANCHORS)  # (256, 3) uint8


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN counts as 0) to inferno colours: `(...) -> (..., 3)` uint8."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    index = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.intp)  # (...)
    return INFERNO_LUT[index]  # (..., 3)


def overlay_title(method: str, *, layer: int | None, head: int | None, label: str, probability: float) -> str:
    """The figure's title line: which map it is, and what the model predicted, with how sure it was.

    >>> overlay_title("layer", layer=-1, head=2, label="7", probability=0.3142)
    'layer -1 · head 2 · predicted 7 (31%)'
    """
    parts = [] if method == "layer" and layer is not None else [method]  # not "layer · layer -1"
    if layer is not None:
        parts.append(f"layer {layer}")
    if head is not None:
        parts.append(f"head {head}")
    parts.append(f"predicted {label} ({percent(probability)})")
    return " · ".join(parts)


def percent(probability: float) -> str:
    """A probability as a whole percentage; never "0%" or "100%" for what is neither, as rounding would say."""
    text = f"{probability:.0%}"
    if text == "0%" and probability > 0.0:
        return "<1%"
    if text == "100%" and probability < 1.0:
        return ">99%"
    return text


def render_overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    *,
    box: Box | None = None,
    alpha: float = 0.5,
    max_side: int = 512,
    title: str | None = None,
) -> bytes:
    """The overlay figure (photo + heat map, colour bar, optional title) as PNG bytes; see `overlay_panel`."""
    figure = overlay_figure(image, heatmap, box=box, alpha=alpha, max_side=max_side, title=title)
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_figure(
    image: Image.Image,
    heatmap: np.ndarray,
    *,
    box: Box | None = None,
    alpha: float = 0.5,
    max_side: int = 512,
    title: str | None = None,
) -> Image.Image:
    """The overlay panel with a colour bar ("high" at the top, "low" at the bottom) and a title line, RGB."""
    panel = overlay_panel(image, heatmap, box=box, alpha=alpha, max_side=max_side)
    return _decorate(panel, title)


def overlay_panel(
    image: Image.Image,
    heatmap: np.ndarray,
    *,
    box: Box | None = None,
    alpha: float = 0.5,
    max_side: int = 512,
) -> Image.Image:
    """The photo, resized for display, with the heat map blended over `box` and the rest dimmed.

    image: the photo the model saw a crop of (RGB; transparency is flattened onto white), in the same
        orientation as the coordinates of `box` (apply EXIF rotation before computing both).
    heatmap: (grid_h, grid_w) in [0, 1], row 0 at the top.
    box: (left, top, right, bottom) in photo pixels that the model input covered; None = the whole photo.
    alpha: weight of the colour map inside the box; 0 shows the photo, 1 only the colour map.
    """
    _check_options(alpha, max_side)
    heat = _check_heatmap(heatmap)  # (gh, gw)
    photo = _flatten(image)
    full: Box = (0.0, 0.0, float(photo.width), float(photo.height))
    region = _check_box(full if box is None else box)
    shown, scale = fit_to_side(photo, max_side)
    pixels = np.asarray(shown, dtype=np.float64)  # (H, W, 3)
    left, top, right, bottom = (round(v * scale) for v in region)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    colours = colormap(_upsample(heat, (right - left, bottom - top))).astype(np.float64)  # (bh, bw, 3)

    out = _dim(pixels)  # (H, W, 3)
    # The box may reach past the photo edge (padding crops); only its visible part is drawn.
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, shown.width), min(bottom, shown.height)
    if x1 > x0 and y1 > y0:
        inside = pixels[y0:y1, x0:x1]  # (h, w, 3)
        heat_part = colours[y0 - top : y1 - top, x0 - left : x1 - left]  # (h, w, 3)
        out[y0:y1, x0:x1] = (1.0 - alpha) * inside + alpha * heat_part
    panel = Image.fromarray(np.round(out).astype(np.uint8))
    _outline(panel, (left, top, right, bottom))
    return panel


def _dim(pixels: np.ndarray) -> np.ndarray:
    grey = pixels @ np.array([0.299, 0.587, 0.114])  # (H, W)
    return _DIM * ((1 - _DESATURATE) * pixels + _DESATURATE * grey[..., None])  # (H, W, 3)


def _outline(panel: Image.Image, box: tuple[int, int, int, int]) -> None:
    """A 1-pixel line just outside `box`; the parts that fall off the panel are simply not drawn."""
    left, top, right, bottom = box
    ImageDraw.Draw(panel).rectangle((left - 1, top - 1, right, bottom), outline=_OUTLINE, width=1)


def fit_to_side(photo: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Resize so the long side is at most `max_side`: Lanczos to shrink, whole-factor nearest to enlarge."""
    long_side = max(photo.size)
    if long_side > max_side:
        scale = max_side / long_side
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        return photo.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0), scale
    factor = max(1, max_side // long_side)
    if factor == 1:
        return photo, 1.0
    size = (photo.width * factor, photo.height * factor)
    return photo.resize(size, Image.Resampling.NEAREST), float(factor)


def _upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a (gh, gw) map to `size` (width, height); each cell stays centred on its patch."""
    field = Image.fromarray(heat.astype(np.float32))  # mode "F"
    smooth = np.asarray(field.resize(size, Image.Resampling.BICUBIC), dtype=np.float64)  # (h, w)
    return np.clip(smooth, 0.0, 1.0)  # bicubic overshoots a little at sharp edges


@dataclass(frozen=True)
class _Layout:
    font_size: int
    margin: int
    title_height: int
    bar_width: int
    gap: int

    @classmethod
    def for_panel(cls, panel: Image.Image, has_title: bool) -> _Layout:
        font_size = int(np.clip(round(max(panel.size) / 32), 12, 20))
        return cls(
            font_size=font_size,
            margin=font_size,
            title_height=round(font_size * 1.8) if has_title else 0,
            bar_width=font_size,
            gap=font_size,
        )


def _decorate(panel: Image.Image, title: str | None) -> Image.Image:
    """Place the panel on a canvas with a vertical colour bar on its right and the title above."""
    layout = _Layout.for_panel(panel, bool(title))
    font = ImageFont.load_default(size=layout.font_size)
    label_width = max(round(font.getlength(text)) for text in ("high", "low"))
    bar_height = max(panel.height, 4 * layout.font_size)
    labels_left = layout.margin + panel.width + layout.gap + layout.bar_width + layout.font_size // 2
    width = labels_left + label_width + layout.margin
    height = 2 * layout.margin + layout.title_height + bar_height
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    top = layout.margin + layout.title_height
    canvas.paste(panel, (layout.margin, top))
    bar_left = layout.margin + panel.width + layout.gap
    canvas.paste(_colour_bar(layout.bar_width, bar_height), (bar_left, top))
    draw.rectangle((bar_left - 1, top - 1, bar_left + layout.bar_width, top + bar_height), outline=_FRAME, width=1)
    draw.text((labels_left, top), "high", fill=_INK, font=font, anchor="lt")
    draw.text((labels_left, top + bar_height), "low", fill=_INK, font=font, anchor="lb")
    if title:
        fitted = _fit_text(title, font, width - 2 * layout.margin)
        draw.text((layout.margin, layout.margin), fitted, fill=_INK, font=font, anchor="lt")
    return canvas


def _colour_bar(width: int, height: int) -> Image.Image:
    ramp = np.linspace(1.0, 0.0, height)  # (height,), high at the top
    colours = colormap(ramp)[:, None, :]  # (height, 1, 3)
    return Image.fromarray(np.repeat(colours, width, axis=1))  # (height, width, 3)


def _fit_text(text: str, font: _Font, width: int) -> str:
    """Cut `text` with an ellipsis so it fits in `width` pixels (binary search: labels can be long)."""
    if font.getlength(text) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with "..." lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if font.getlength(text[:middle] + "...") <= width else (low, middle)
    return text[:low].rstrip() + "..."


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (a transparent PNG would otherwise turn black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_options(alpha: float, max_side: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameter(f"alpha {alpha} is outside [0, 1]; 0 shows the photo, 1 only the heat map")
    if not MIN_SIDE <= max_side <= MAX_SIDE:
        raise InvalidParameter(f"max_side {max_side} is outside [{MIN_SIDE}, {MAX_SIDE}] pixels")


def _check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"heatmap must be a non-empty (grid_h, grid_w) array, got shape {heat.shape}")
    if not np.isfinite(heat).all():
        raise ValueError("heatmap contains NaN or infinite values")
    return np.clip(heat, 0.0, 1.0)


def _check_box(box: Box) -> Box:
    left, top, right, bottom = (float(v) for v in box)
    if not all(np.isfinite((left, top, right, bottom))) or right <= left or bottom <= top:
        raise ValueError(f"box {box} is not (left, top, right, bottom) with right > left and bottom > top")
    return left, top, right, bottom
