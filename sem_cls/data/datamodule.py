"""SEMDataModule: `<root>/<Class>/*.jpg` -> stratified train/val/test split -> cropped, resized batches."""

import hashlib
import logging
from pathlib import Path

import lightning as L
import numpy as np
import timm.data
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from sem_cls.data.infobar import InfoBarCrop
from sem_cls.errors import DataNotFoundError, UserError
from sem_cls.models.feature_cache import FeatureCache, file_digest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
SPLITS = ("train", "val", "test")


def scan_class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names) and (image path, class index) pairs under `root`."""
    if not root.is_dir():
        raise DataNotFoundError(f"Data folder {root} does not exist.")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [
        (path, index)
        for index, name in enumerate(class_names)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataNotFoundError(
            f"Data folder {root} holds no <Class>/ folders with images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return class_names, samples


def stratified_split(
    labels: list[int], ratios: tuple[float, float, float], seed: int
) -> dict[str, list[int]]:
    """Indices per split, stratified by class and deterministic from `seed`."""
    train_ratio, val_ratio, test_ratio = ratios
    if min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"data.split={list(ratios)} must be three positive ratios summing to 1.")
    indices = list(range(len(labels)))
    try:
        train, rest = train_test_split(
            indices, train_size=train_ratio, stratify=labels, random_state=seed
        )
        val, test = train_test_split(
            rest,
            train_size=val_ratio / (val_ratio + test_ratio),
            stratify=[labels[i] for i in rest],
            random_state=seed,
        )
    except ValueError as err:
        raise UserError(
            f"Cannot split {len(labels)} images by class with ratios {list(ratios)}: {err}. "
            "Add images to the smallest classes or change data.split."
        ) from err
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


class SEMImageDataset(Dataset):
    """Reads an image, crops the info bar, applies the backbone's transform; returns (x, label).

    JPEGs are decoded at the smallest power-of-two reduction that keeps `min_side` pixels, which
    is several times cheaper than decoding 1024x768 and resizing away most of it.
    """

    def __init__(
        self, samples: list[tuple[Path, int]], info_bar: InfoBarCrop, transform, min_side: int = 0
    ):
        self.samples = samples
        self.info_bar = info_bar
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            if self.min_side:
                image.draft("RGB", (self.min_side, self.min_side))
            image = self.info_bar(image.convert("RGB"))
        return self.transform(image), label


class FeatureDataset(Dataset):
    """(features, label) pairs from a memory-mapped (N, num_features) matrix."""

    def __init__(self, features: np.ndarray, labels: list[int]):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.features[index])), self.labels[index]


class SEMDataModule(L.LightningDataModule):
    """Folder of `<Class>/` images -> deterministic stratified split -> DataLoaders.

    The transform follows the backbone's own data config (input size, mean/std,
    interpolation), set through `data_config` before `setup`. With a frozen backbone set in
    `frozen_backbone` and `cache_features`, batches are its cached features, (B, num_features),
    instead of images.
    """

    def __init__(
        self,
        data_dir: str,
        split: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 42,
        info_bar: str | int = "auto",
        batch_size: int = 32,
        num_workers: int = 2,
        cache_features: bool = True,
        cache_dir: str | None = None,
        bf16: bool = True,
        synthetic: dict | None = None,
        missing_hint: str = "",
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.split_ratios = tuple(split)
        self.seed = seed
        self.info_bar = InfoBarCrop(info_bar)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_features = cache_features
        self.feature_cache = FeatureCache(cache_dir) if cache_dir else None
        self.bf16 = bf16
        self.synthetic = synthetic
        self.missing_hint = missing_hint
        self.data_config: dict | None = None
        # Set to the backbone when it is frozen: batches are then its cached features.
        self.frozen_backbone: torch.nn.Module | None = None
        self.features: dict[str, np.ndarray] = {}
        self.splits: dict[str, list[tuple[Path, int]]] = {}
        self._class_names: list[str] | None = None

    def attach_model(self, model) -> None:
        """Use the model's input size and normalisation, and its features when frozen."""
        self.data_config = model.data_config
        self.frozen_backbone = model.backbone if model.frozen else None

    def prepare_data(self) -> None:
        """Generate the built-in dataset into `data_dir` when configured (once; then reused)."""
        if self.synthetic:
            from sem_cls.data.synthetic import generate_dataset

            generate_dataset(self.data_dir, **self.synthetic)

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._scan()
        return self._class_names

    def _scan(self) -> None:
        try:
            self._class_names, samples = scan_class_folders(self.data_dir)
        except DataNotFoundError as err:
            raise DataNotFoundError(f"{err} {self.missing_hint}".strip()) from None
        indices = stratified_split([label for _, label in samples], self.split_ratios, self.seed)
        self.splits = {name: [samples[i] for i in indices[name]] for name in SPLITS}
        log.info(
            "%d images in %d classes from %s; split %s",
            len(samples),
            len(self._class_names),
            self.data_dir,
            {name: len(items) for name, items in self.splits.items()},
        )

    def split_fingerprint(self) -> str:
        """sha256 over (split, class, relative path, size) of every image: equal splits, equal prints."""
        self.class_names  # noqa: B018 -- scans on first use
        digest = hashlib.sha256()
        for name in SPLITS:
            for path, label in self.splits[name]:
                relative = path.relative_to(self.data_dir).as_posix()
                digest.update(f"{name}\t{label}\t{relative}\t{path.stat().st_size}\n".encode())
        return digest.hexdigest()

    def split_table(self) -> list[dict]:
        """One row per image: split, class and path relative to the data folder."""
        return [
            {
                "split": name,
                "class": self.class_names[label],
                "path": path.relative_to(self.data_dir).as_posix(),
            }
            for name in SPLITS
            for path, label in self.splits[name]
        ]

    def state_dict(self) -> dict:
        # Saved in every checkpoint, so evaluation can tell whether it sees the same split.
        return {"class_names": self.class_names, "split_fingerprint": self.split_fingerprint()}

    def setup(self, stage: str | None = None) -> None:
        if self.data_config is None:
            raise RuntimeError("Set SEMDataModule.data_config from the backbone before setup().")
        self.class_names  # noqa: B018 -- scans on first use
        # Frozen-backbone baseline: the evaluation transform (resize + centre crop) for every split.
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)
        # The transform resizes the short side to input/crop_pct; 10% more covers a typical info
        # bar (8% of the height), so the crop is still downsampled, not blown up.
        resized_side = self.data_config["input_size"][-1] / self.data_config["crop_pct"]
        self.decode_side = int(resized_side * 1.1)
        self.use_cache = bool(
            self.frozen_backbone is not None and self.cache_features and self.feature_cache
        )
        if not self.use_cache:
            log.info("Feature cache off: the backbone runs on every batch of every epoch.")

    def split_features(self, split: str) -> np.ndarray:
        """The frozen backbone's features of a split, from the cache or extracted into it."""
        if split not in self.features:
            preprocessing = {
                "info_bar": self.info_bar.mode,
                "decode_side": self.decode_side,
                "transform": repr(self.transform),
            }
            self.features[split] = self.feature_cache.features(
                self.frozen_backbone,
                preprocessing,
                self._image_dataset(split),
                [file_digest(path) for path, _ in self.splits[split]],
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                bf16=self.bf16,
            )
        return self.features[split]

    def _image_dataset(self, split: str) -> "SEMImageDataset":
        return SEMImageDataset(self.splits[split], self.info_bar, self.transform, self.decode_side)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if self.use_cache:
            # Rows of a memory-mapped matrix: cheaper to read in-process than to ship to workers.
            labels = [label for _, label in self.splits[split]]
            dataset = FeatureDataset(self.split_features(split), labels)
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle)
        return DataLoader(
            self._image_dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
