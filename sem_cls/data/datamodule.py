"""SEMDataModule: `<root>/<Class>/*.jpg` -> stratified train/val/test split -> cropped, resized batches."""

import hashlib
import logging
from pathlib import Path

import lightning as L
import timm.data
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from sem_cls.data.infobar import InfoBarCrop
from sem_cls.errors import DataNotFoundError, UserError

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
    """Reads an image, crops the info bar, applies the backbone's transform; returns (x, label)."""

    def __init__(self, samples: list[tuple[Path, int]], info_bar: InfoBarCrop, transform):
        self.samples = samples
        self.info_bar = info_bar
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = self.info_bar(image.convert("RGB"))
        return self.transform(image), label


class SEMDataModule(L.LightningDataModule):
    """Folder of `<Class>/` images -> deterministic stratified split -> DataLoaders.

    The transform follows the backbone's own data config (input size, mean/std,
    interpolation), set through `data_config` before `setup`.
    """

    def __init__(
        self,
        data_dir: str,
        split: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 42,
        info_bar: str | int = "auto",
        batch_size: int = 32,
        num_workers: int = 2,
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
        self.synthetic = synthetic
        self.missing_hint = missing_hint
        self.data_config: dict | None = None
        self.splits: dict[str, list[tuple[Path, int]]] = {}
        self._class_names: list[str] | None = None

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

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            SEMImageDataset(self.splits[split], self.info_bar, self.transform),
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
