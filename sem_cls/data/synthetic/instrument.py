"""The microscope: detector response, scan noise, the instrument's info bar, and
`render_image`, which puts a class renderer's specimen through them."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from sem_cls.data.synthetic.drawing import grid
from sem_cls.data.synthetic.renderers import CLASSES, RENDERERS

INFO_BAR_HEIGHT_AT_768 = 60
INFO_BAR_KINDS = ("bright", "dark")


def _microscope(
    rng: np.random.Generator, specimen: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Specimen signal at working size -> noisy 8-bit micrograph at the output size."""
    width, height = size
    h, w = specimen.shape
    if rng.random() < 0.5:
        specimen = specimen[:, ::-1]
    if rng.random() < 0.5:
        specimen = specimen[::-1]
    img = ndi.gaussian_filter(specimen, rng.uniform(0.5, 1.2))
    # Edge effect: secondary-electron yield rises where the surface is steep
    gy, gx = np.gradient(ndi.gaussian_filter(img, 1.0))
    img = img + rng.uniform(0.8, 3.0) * np.sqrt(gx * gx + gy * gy)
    xx, yy = grid(w, h)
    img = img + rng.normal(0, 0.08) * (xx / w - 0.5) + rng.normal(0, 0.08) * (yy / h - 0.5)
    img = img - rng.uniform(0, 0.15) * ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2)
    img = (img - 0.5) * rng.uniform(0.75, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    # Soft clip into the detector's range; black and white stay clear of the info bar's levels
    img = 0.5 + 0.42 * np.tanh((img - 0.5) / 0.42)
    img = img ** rng.uniform(0.8, 1.25)
    full = np.asarray(Image.fromarray(img.astype(np.float32)).resize(size, Image.BICUBIC)) * 255
    # Shot noise grows with the signal; each scan line gets its own offset
    shot = rng.uniform(0.4, 1.1) * np.sqrt(np.maximum(full, 1)) + rng.uniform(2, 5)
    full = full + shot * rng.standard_normal((height, width), dtype=np.float32)
    full += rng.normal(0, rng.uniform(0.5, 3), (height, 1)).astype(np.float32)
    for row in rng.integers(0, height, rng.poisson(0.5)):  # scan-line glitches
        full[row : row + 2] = np.roll(full[row : row + 2], int(rng.integers(-6, 7)), axis=1)
    return np.clip(full, 0, 255).astype(np.uint8)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SCALES = ("100 nm", "200 nm", "300 nm", "500 nm", "1 µm", "2 µm", "10 µm", "20 µm", "100 µm")


def _draw_length(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont,
    ink: int,
) -> None:
    """Draw a length such as "2 µm"; the default font has no µ, so it is a u with a tail."""
    x, y = xy
    number, micro, unit = text.partition("µ")
    draw.text((x, y), number, fill=ink, font=font)
    if not micro:
        return
    x += draw.textlength(number, font=font)
    draw.text((x, y), "u", fill=ink, font=font)
    left, top, _, bottom = font.getbbox("u")
    stem = max(1, round(font.size / 12))
    draw.line(
        [(x + left + stem / 2, y + top), (x + left + stem / 2, y + bottom + 0.35 * (bottom - top))],
        fill=ink,
        width=stem,
    )
    draw.text((x + draw.textlength("u", font=font), y), unit, fill=ink, font=font)


def _info_bar(rng: np.random.Generator, width: int, height: int, kind: str) -> np.ndarray:
    """An instrument data bar: flat band, scale bar on the left, acquisition settings."""
    bar_height = max(4, round(INFO_BAR_HEIGHT_AT_768 * height / 768))
    if kind == "bright":
        background, ink = int(rng.integers(249, 256)), int(rng.integers(0, 50))
    else:
        background, ink = int(rng.integers(0, 6)), int(rng.integers(215, 256))
    bar = Image.new("L", (width, bar_height), background)
    draw = ImageDraw.Draw(bar)
    font = _font(max(4, round(bar_height * 0.28)))
    pad = bar_height * 0.12
    line_y = bar_height * 0.72
    length = width * rng.uniform(0.05, 0.13)
    _draw_length(draw, (pad, pad), str(rng.choice(_SCALES)), font, ink)
    draw.line(
        [(pad, line_y), (pad + length, line_y)], fill=ink, width=max(1, round(bar_height / 20))
    )
    mag = 10 ** rng.uniform(2, 5.3)
    mag_text = f"{mag / 1000:.2f} K X" if mag >= 1000 else f"{mag:.0f} X"
    rows = (
        [
            f"EHT = {rng.choice([1, 2, 3, 5, 10, 15, 20]):.2f} kV",
            f"WD = {rng.uniform(2, 15):.1f} mm",
            f"Signal A = {rng.choice(['InLens', 'SE2', 'BSD'])}",
            f"Date: {rng.integers(1, 29)} {rng.choice(_MONTHS)} {rng.integers(2008, 2018)}",
        ],
        [
            f"Mag = {mag_text}",
            f"Stage at T = {rng.uniform(0, 60):.1f} °",
            f"Photo No. = {rng.integers(1, 9999)}",
            f"Time: {rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}",
        ],
    )
    start = rng.uniform(0.18, 0.26)
    for r, texts in enumerate(rows):
        for col, text in enumerate(texts):
            x = width * (start + col * 0.19)
            draw.text((x, pad + r * bar_height * 0.42), text, fill=ink, font=font)
    if rng.random() < 0.5:  # some instruments frame the bar, just inside its edge
        inset = max(1, bar_height // 30)
        draw.rectangle((inset, inset, width - 1 - inset, bar_height - 1 - inset), outline=ink)
    return np.asarray(bar)


def render_image(
    class_name: str,
    rng: np.random.Generator,
    size: tuple[int, int] = (1024, 768),
    info_bar: str | None = None,
) -> Image.Image:
    """One SEM-like RGB image (R == G == B) of `class_name`, `size` = (width, height).

    `info_bar` is None, "bright" or "dark"; a bar replaces the bottom rows of the image.
    """
    if class_name not in RENDERERS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    if info_bar not in (None, *INFO_BAR_KINDS):
        raise ValueError(f"info_bar must be None, 'bright' or 'dark', not {info_bar!r}")
    width, height = int(size[0]), int(size[1])
    if width < 32 or height < 32:
        raise ValueError(f"image size {size} is too small (at least 32 x 32)")
    specimen = RENDERERS[class_name](rng, max(16, width // 2), max(16, height // 2))
    gray = _microscope(rng, specimen.astype(np.float32), (width, height))
    if info_bar is not None:
        bar = _info_bar(rng, width, height, info_bar)
        gray[height - bar.shape[0] :] = bar
    return Image.fromarray(gray, "L").convert("RGB")
