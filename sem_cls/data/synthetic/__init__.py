"""Built-in SEM-like dataset: procedural images for the 10 NFFA-Europe classes in the NFFA layout.

`python -m sem_cls.data.synthetic --root data/synthetic --images-per-class 40` writes it once.
drawing -> renderers (one per class) -> instrument (noise, info bar) -> dataset (files on disk).
"""

from sem_cls.data.synthetic.dataset import (
    GENERATOR_VERSION,
    JPEG_QUALITY,
    MARKER_NAME,
    generate_dataset,
    image_name,
    info_bar_kind,
    main,
)
from sem_cls.data.synthetic.instrument import INFO_BAR_HEIGHT_AT_768, INFO_BAR_KINDS, render_image
from sem_cls.data.synthetic.renderers import CLASSES

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "INFO_BAR_HEIGHT_AT_768",
    "INFO_BAR_KINDS",
    "JPEG_QUALITY",
    "MARKER_NAME",
    "generate_dataset",
    "image_name",
    "info_bar_kind",
    "main",
    "render_image",
]
