"""Reading SEM images of any common format as 8-bit RGB or grayscale arrays the models expect."""

from pathlib import Path

import numpy as np
from PIL import Image

from sem_cls.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# 50 megapixels: six times the largest NFFA image (3072x2304), far below what fills the memory.
DEFAULT_MAX_PIXELS = 50_000_000
# Modes with more than 8 bits per channel, as 16-bit TIFFs from detectors come.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageTooLarge(ValueError):
    """An image whose header announces more pixels than allowed (decompression-bomb guard)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def check_max_pixels(max_pixels: int) -> int:
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise UserError(f"data.max_pixels={max_pixels!r} must be a positive number of pixels.")
    return max_pixels


def open_image(
    path, mode: str, min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """The image at `path` (a path or file object) as 8-bit `mode` ("RGB" or "L"), decoded no
    larger than needed, and its original (width, height).

    JPEGs decode at the smallest power-of-two reduction that keeps `min_side` pixels on both
    sides, several times cheaper than a full decode that is resized away later. 16-bit and float
    images are stretched from their own min-max range to 0-255, since detectors rarely fill 16
    bits. Alpha is dropped, palettes expanded. The pixel limit is checked on the header, before
    anything is decoded.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:  # PIL's own, far larger limit
        raise ImageTooLarge(f"{err}; data.max_pixels={max_pixels:,}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} pixels is more than data.max_pixels={max_pixels:,}"
            )
        if min_side:
            image.draft(mode, (min_side, min_side))
        image.load()
        if image.mode in _WIDE_MODES:
            values = np.asarray(image, dtype=np.float32)
            low, high = float(values.min()), float(values.max())
            values = (values - low) * (255.0 / max(high - low, 1e-6))
            image = Image.fromarray(values.round().astype(np.uint8), "L")
        return image.convert(mode), (width, height)


def scale_box(box: tuple[int, int, int, int], original: tuple[int, int], decoded: tuple[int, int]):
    """A crop box in original pixels, mapped onto a (possibly reduced) decode of the image."""
    sx, sy = decoded[0] / original[0], decoded[1] / original[1]
    left, top, right, bottom = box
    return round(left * sx), round(top * sy), max(1, round(right * sx)), max(1, round(bottom * sy))
