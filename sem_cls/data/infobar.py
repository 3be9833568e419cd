"""InfoBarCrop: find the instrument's data bar near the bottom of an SEM image and cut it off.

SEM instruments burn a band of text (EHT, WD, Mag, scale bar) into the image, bright with
dark text or dark with bright text. It says nothing about the specimen, so it is removed
before a model sees the image.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import binary_closing

# A bar row is mostly flat background at one end of the range (near 0 or 255), with some text
# on it; dark or bright specimen areas are noisier than that.
EXTREME_LOW, EXTREME_HIGH = 8, 247
MIN_BACKGROUND_SHARE = 0.6
# Bars are 40-90 px on a 768 px image; search the bottom quarter, where instruments put them.
MIN_BAR_SHARE, MAX_BAR_SHARE, SEARCH_SHARE = 0.04, 0.14, 0.25


@dataclass(frozen=True)
class InfoBarCrop:
    """Crop the info bar: `mode` is "auto" (detect), "none", or a fixed number of bottom pixels.

    Everything from the bar's top row down is cut, so content that an instrument left below the
    bar goes too; that is a few rows of a 768-row image.
    """

    mode: str | int = "auto"

    def __post_init__(self):
        if self.mode not in ("auto", "none") and not (
            isinstance(self.mode, int) and self.mode >= 0
        ):
            raise ValueError(
                f"info-bar crop mode {self.mode!r} is not 'auto', 'none' or a pixel count >= 0"
            )

    def crop_box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the region to keep."""
        width, height = image.size
        bar_top = detect_bar_top(np.asarray(image.convert("L"))) if self.mode == "auto" else height
        return self.box(width, height, bar_top)

    def box(self, width: int, height: int, bar_top: int) -> tuple[int, int, int, int]:
        """The region to keep of a `width` x `height` image whose bar was detected at `bar_top`."""
        if self.mode == "none":
            return 0, 0, width, height
        if self.mode == "auto":
            return 0, 0, width, bar_top
        return 0, 0, width, max(1, height - self.mode)

    def __call__(self, image: Image.Image) -> Image.Image:
        box = self.crop_box(image)
        return image if box == (0, 0, *image.size) else image.crop(box)


def detect_bar_top(gray: np.ndarray) -> int:
    """Row where the info bar starts, or the image height when there is none.

    (H, W) uint8 -> row index. Looks for the highest run of bar rows in the bottom quarter that
    reaches a plausible bar height; a run that is too tall is dark or bright specimen, not a bar.
    """
    height = gray.shape[0]
    top_of_search = int(height * (1 - SEARCH_SHARE))
    rows = gray[top_of_search:]
    low_share = (rows <= EXTREME_LOW).mean(axis=1)
    high_share = (rows >= EXTREME_HIGH).mean(axis=1)
    is_bar_row = np.maximum(low_share, high_share) >= MIN_BACKGROUND_SHARE
    # A line of large text can dip below the background share; bridge gaps of a few rows.
    is_bar_row = binary_closing(is_bar_row, structure=np.ones(5, bool), border_value=0) | is_bar_row
    min_rows, max_rows = int(height * MIN_BAR_SHARE), int(height * MAX_BAR_SHARE)

    best_top, run_end = height, None
    # Walk upwards so the run found last is the highest one.
    for offset in range(len(rows) - 1, -1, -1):
        if is_bar_row[offset] and run_end is None:
            run_end = offset
        if run_end is not None and (not is_bar_row[offset] or offset == 0):
            run_top = offset + (0 if is_bar_row[offset] else 1)
            run_length = run_end - run_top + 1
            touches_search_edge = is_bar_row[offset] and offset == 0
            if min_rows <= run_length <= max_rows and not touches_search_edge:
                best_top = top_of_search + run_top
            run_end = None
    return best_top
