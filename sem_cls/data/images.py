"""Finding SEM image files under a folder, and reading any common format as the 8-bit RGB or
grayscale images the models expect."""

import errno
import os
import stat
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

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


def walk_files(folder: Path) -> list[tuple[Path, str]]:
    """Every file under `folder`, in sorted order, as (path, "") or (path, why it cannot be read).

    Symbolic links to files and folders are followed; a link that leads back to a folder above
    it (a loop) or nowhere is returned with the reason, so it is reported rather than walked
    forever or skipped. Hidden files and folders (".name") are skipped.
    """
    found = []

    def visit(directory: Path, ancestors: frozenset) -> None:
        try:
            names = sorted(entry.name for entry in os.scandir(directory))
        except OSError as err:
            found.append((directory, f"folder cannot be listed: {err.strerror}"))
            return
        for name in names:
            if name.startswith("."):
                continue
            path = directory / name
            try:
                info = path.stat()  # follows links
            except OSError as err:
                if err.errno == errno.ELOOP:
                    found.append((path, "symlink loop: the link leads back to itself"))
                elif path.is_symlink():
                    found.append((path, f"broken symlink to {os.readlink(path)}"))
                else:
                    found.append((path, f"cannot be read: {err.strerror}"))
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    target = os.path.realpath(path)
                    found.append((path, f"symlink loop: the link leads back to {target}"))
                else:
                    visit(path, ancestors | {key})
            elif stat.S_ISREG(info.st_mode):
                found.append((path, ""))

    root = folder.stat()
    visit(folder, frozenset({(root.st_dev, root.st_ino)}))
    return found


def page_count(path) -> int:
    """Pages (frames) of an image file: more than 1 for multi-page TIFFs, of which the first is
    used."""
    with Image.open(path) as image:
        return getattr(image, "n_frames", 1)


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
    anything is decoded. An EXIF orientation is applied (the size returned is the upright one),
    so ingest, training, evaluation and prediction see the same upright pixels; of a multi-page
    TIFF the first page is read.
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
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if min_side:
            image.draft(mode, (min_side, min_side))
        image.load()
        if orientation in range(2, 9):
            image = ImageOps.exif_transpose(image)
            if orientation >= 5:  # 5-8 turn the image by 90 degrees
                width, height = height, width
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
