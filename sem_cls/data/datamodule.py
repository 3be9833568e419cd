"""SEMDataModule: `<root>/<Class>/` images -> checked, duplicate-aware split -> cropped batches."""

import logging
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import timm.data
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from sem_cls.data import splits as split_lib
from sem_cls.data.augment import sem_train_transform
from sem_cls.data.images import DEFAULT_MAX_PIXELS, check_max_pixels, open_image, scale_box
from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.ingest import INGEST_VERSION, Ingest, ingest
from sem_cls.errors import DataNotFoundError, UserError
from sem_cls.models.engines import ENGINES, create_engine
from sem_cls.models.feature_cache import FeatureCache

log = logging.getLogger(__name__)

SPLITS = split_lib.SPLITS
SAMPLERS = ("none", "balanced")


class Sample(NamedTuple):
    """One image as the loaders see it: where, which class, what to keep, what it holds."""

    path: Path
    label: int
    crop_box: tuple[int, int, int, int]  # in original pixels
    size: tuple[int, int]  # original (width, height)
    sha256: str


class SEMImageDataset(Dataset):
    """Reads an image, crops its recorded info-bar box, applies the backbone's transform.

    JPEGs are decoded at the smallest power-of-two reduction that keeps `min_side` pixels, which
    is several times cheaper than decoding 1024x768 and resizing away most of it.
    """

    def __init__(self, samples: list[Sample], transform, min_side: int = 0, max_pixels=None):
        self.samples = samples
        self.transform = transform
        self.min_side = min_side
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image, size = open_image(sample.path, "RGB", self.min_side, self.max_pixels)
        box = scale_box(sample.crop_box, size, image.size)
        if box != (0, 0, *image.size):
            image = image.crop(box)
        return self.transform(image), sample.label


class FeatureDataset(Dataset):
    """(features, label) pairs from a memory-mapped (N, num_features) matrix."""

    def __init__(self, features: np.ndarray, labels: list[int]):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.features[index])), self.labels[index]


def eval_preprocessing(data_config: dict):
    """The backbone's evaluation transform (resize + centre crop) and the side JPEGs are decoded
    at for it; shared by the loaders and by prediction, so both see the same pixels."""
    transform = timm.data.create_transform(**data_config, is_training=False)
    # The transform resizes the short side to input/crop_pct; 10% more covers a typical info
    # bar (8% of the height), so the crop is still downsampled, not blown up.
    resized_side = data_config["input_size"][-1] / data_config["crop_pct"]
    return transform, int(resized_side * 1.1)


class SEMDataModule(L.LightningDataModule):
    """Folder of `<Class>/` images -> ingest -> manifest (split by duplicate groups) -> loaders.

    `prepare_data` checks every file once (see sem_cls.data.ingest); the split keeps exact and
    near-duplicates together and is stratified and seeded (sem_cls.data.splits), or is read from
    a `manifest` of an earlier run. The transform follows the backbone's own data config, set
    through `attach_model` before `setup`. With a frozen backbone and `cache_features`, batches
    are its cached features, (B, num_features), instead of images.
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
        engine: str = "torch",
        synthetic: dict | None = None,
        missing_hint: str = "",
        folds: int | None = None,
        fold: int = 0,
        near_duplicate_bits: int = split_lib.NEAR_DUPLICATE_BITS,
        manifest: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sampler: str = "none",
        augment: dict | None = None,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise UserError(f"data.sampler={sampler!r} is not one of {list(SAMPLERS)}.")
        if engine not in ENGINES:
            raise UserError(f"data.engine={engine!r} is not one of {list(ENGINES)}.")
        self.data_dir = Path(data_dir)
        self.split_ratios = tuple(split)
        self.seed = seed
        self.info_bar = InfoBarCrop(info_bar)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_features = cache_features
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.feature_cache = FeatureCache(self.cache_dir / "features") if cache_dir else None
        self.bf16 = bf16
        self.engine = engine
        self.synthetic = synthetic
        self.missing_hint = missing_hint
        self.folds, self.fold = folds, fold
        self.near_duplicate_bits = near_duplicate_bits
        self.manifest_path = Path(manifest) if manifest else None
        self.max_pixels = check_max_pixels(max_pixels)
        self.sampler = sampler
        # Training-time augmentation (sem_cls.data.augment); off: {} or None.
        self.augment = dict(augment or {})
        self.data_config: dict | None = None
        # Set to the model when its backbone is frozen: batches are then its cached features.
        self.frozen_model = None
        self.features: dict[str, np.ndarray] = {}
        self.samples: dict[str, list[Sample]] = {}
        self.manifest: list[dict] = []
        self.ingested: Ingest | None = None
        self._class_names: list[str] | None = None

    def attach_model(self, model) -> None:
        """Use the model's input size and normalisation, and its features when frozen."""
        self.data_config = model.data_config
        self.frozen_model = model if model.frozen else None
        if self.engine != "torch" and not model.frozen:
            raise UserError(
                f"data.engine={self.engine} serves a frozen backbone's feature extraction; "
                f"model.freeze={model.hparams.freeze!r} fine-tunes it, which runs on torch. Set "
                "data.engine=torch, or model.freeze=all for a linear probe."
            )

    def feature_engine(self):
        """The frozen model's feature engine (data.engine), built on first use, once the
        backbone sits on its device; the model runs its backbone with it too."""
        model = self.frozen_model
        if model.engine is None:
            on_gpu = next(model.backbone.parameters()).device.type != "cpu"
            kind = self.engine
            if kind != "torch" and on_gpu:
                log.warning("data.engine=%s runs on CPU only; this GPU run uses torch.", kind)
                kind = "torch"
            model.use_engine(
                create_engine(
                    kind,
                    model.backbone,
                    tuple(self.data_config["input_size"]),
                    self.bf16,
                    self.cache_dir / "engines" if self.cache_dir else None,
                    self.feature_cache.weights(model.backbone) if self.feature_cache else None,
                )
            )
        return model.engine

    def prepare_data(self) -> None:
        """Generate the built-in dataset when configured, then check every file (once; cached)."""
        if self.synthetic:
            from sem_cls.data.synthetic import generate_dataset

            generate_dataset(self.data_dir, **self.synthetic)
        self.ingest(self.data_dir)

    def ingest(self, folder: Path) -> Ingest:
        try:
            result = ingest(
                folder,
                cache_dir=self.cache_dir / "ingest" if self.cache_dir else None,
                max_pixels=self.max_pixels,
                workers=max(1, self.num_workers),
            )
        except DataNotFoundError as err:
            raise DataNotFoundError(f"{err} {self.missing_hint}".strip()) from None
        if folder == self.data_dir:
            self.ingested = result
            print(f"Ingest of {folder}: {result.summary()}")
        return result

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._load_manifest()
        return self._class_names

    def _load_manifest(self) -> None:
        ingested = self.ingested or self.ingest(self.data_dir)
        if self.manifest_path:
            rows = self._checked_manifest(split_lib.read_manifest(self.manifest_path), ingested)
        else:
            rows = self._split(ingested)
        self._class_names = sorted({row["class"] for row in rows})
        self.manifest = rows
        label_of = {name: index for index, name in enumerate(self._class_names)}
        self.samples = {name: [] for name in SPLITS}
        for row in rows:
            self.samples[row["split"]].append(self._sample(row, label_of[row["class"]]))
        log.info(
            "%d images in %d classes from %s; split %s",
            len(rows),
            len(self._class_names),
            self.data_dir,
            {name: len(items) for name, items in self.samples.items()},
        )

    def _sample(self, row: dict, label: int, root: Path | None = None) -> Sample:
        box = tuple(row[key] for key in ("crop_left", "crop_top", "crop_right", "crop_bottom"))
        size = (row["width"], row["height"])
        return Sample((root or self.data_dir) / row["path"], label, box, size, row["sha256"])

    def _rows(self, records: list[dict]) -> list[dict]:
        """Manifest rows of ingest records, with the crop box of the configured info-bar mode."""
        rows = []
        for record in records:
            box = self.info_bar.box(record["width"], record["height"], record["bar_top"])
            row = {key: record[key] for key in ("path", "class", "sha256", "width", "height")}
            row.update(zip(("crop_left", "crop_top", "crop_right", "crop_bottom"), box))
            rows.append(row)
        return rows

    def _split(self, ingested: Ingest) -> list[dict]:
        records = ingested.images
        label_of = {name: index for index, name in enumerate(ingested.class_names)}
        labels = np.array([label_of[r["class"]] for r in records])
        groups = split_lib.duplicate_groups(
            [r["sha256"] for r in records], [r["phash"] for r in records], self.near_duplicate_bits
        )
        split = split_lib.group_split(labels, groups, self.split_ratios, self.seed)
        if self.folds is not None:
            split = split_lib.fold_split(labels, groups, split, self.folds, self.fold, self.seed)
        split_lib.check_every_class_in_every_split(ingested.class_names, labels, split)
        rows = self._rows(records)
        for row, group, index in zip(rows, groups.tolist(), split.tolist(), strict=True):
            row.update(group=group, split=SPLITS[index])
        return rows

    def _checked_manifest(self, rows: list[dict], ingested: Ingest) -> list[dict]:
        """The rows of a given manifest, if every image is still there, usable and unchanged."""
        current = {r["path"]: r["sha256"] for r in ingested.images}
        changed = [row["path"] for row in rows if current.get(row["path"]) != row["sha256"]]
        if changed:
            raise UserError(
                f"{len(changed)} images of data.manifest={self.manifest_path} are missing, "
                f"unusable or changed in {self.data_dir}, e.g. {', '.join(changed[:3])}. Use the "
                "data the manifest was made from, or drop data.manifest to split anew."
            )
        return rows

    def split_manifest(self) -> list[dict]:
        """One row per image: path, class, split, sha256, duplicate group, size, crop box."""
        self.class_names  # noqa: B018 -- builds the manifest on first use
        return self.manifest

    def split_fingerprint(self) -> str:
        """sha256 over (path, class, split, content) of every image: equal splits, equal prints."""
        self.class_names  # noqa: B018 -- builds the manifest on first use
        return split_lib.fingerprint(self.manifest)

    def write_data_files(self, folder: Path) -> Path:
        """manifest.csv (the split, reusable as data.manifest) and ingest_report.csv (files left
        out, and why) into `folder`."""
        self.class_names  # noqa: B018 -- builds the manifest on first use
        folder.mkdir(parents=True, exist_ok=True)
        split_lib.write_manifest(self.manifest, folder / "manifest.csv")
        if self.ingested:
            self.ingested.write_report(folder / "ingest_report.csv")
        return folder

    def class_counts(self, split: str) -> np.ndarray:
        """Images per class in `split`, in class-index order."""
        self.class_names  # noqa: B018 -- builds the manifest on first use
        labels = [sample.label for sample in self.samples[split]]
        return np.bincount(labels, minlength=len(self.class_names))

    def state_dict(self) -> dict:
        # Saved in every checkpoint, so evaluation can tell whether it sees the same split.
        return {"class_names": self.class_names, "split_fingerprint": self.split_fingerprint()}

    def external_samples(self, folder: Path, class_names: list[str]) -> list[Sample]:
        """Every usable image of another `<Class>/` folder, labelled by `class_names`."""
        ingested = self.ingest(folder)
        unknown = sorted(set(ingested.class_names) - set(class_names))
        if unknown:
            raise UserError(
                f"External folder {folder} has class folders {unknown} that the model does not "
                f"know. Known classes: {', '.join(class_names)}. Rename or remove those folders."
            )
        label_of = {name: index for index, name in enumerate(class_names)}
        return [
            self._sample(row, label_of[row["class"]], root=folder)
            for row in self._rows(ingested.images)
        ]

    def setup(self, stage: str | None = None) -> None:
        if self.data_config is None:
            raise RuntimeError("Set SEMDataModule.data_config from the backbone before setup().")
        self.class_names  # noqa: B018 -- builds the manifest on first use
        # Frozen-backbone baseline: the evaluation transform (resize + centre crop) for every split.
        self.transform, self.decode_side = eval_preprocessing(self.data_config)
        self.train_transform = (
            sem_train_transform(self.data_config, **self.augment) if self.augment else None
        )
        self.use_cache = bool(
            self.frozen_model is not None and self.cache_features and self.feature_cache
        )
        if not self.use_cache:
            log.info("Feature cache off: the backbone runs on every batch of every epoch.")

    def split_features(self, split: str, samples: list[Sample] | None = None) -> np.ndarray:
        """The frozen backbone's features of a split, from the cache or extracted into it."""
        if split not in self.features:
            samples = samples if samples is not None else self.samples[split]
            preprocessing = {
                "ingest": INGEST_VERSION,
                "decode_side": self.decode_side,
                "transform": repr(self.transform),
            }
            self.features[split] = self.feature_cache.features(
                self.feature_engine(),
                preprocessing,
                self.image_dataset(samples),
                # Content and crop: the same bytes cropped otherwise give other features.
                [f"{s.sha256}:{s.crop_box}" for s in samples],
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                # Under DDP the ranks share the extraction (each a slice of the images).
                strategy=self.trainer.strategy if self.trainer is not None else None,
            )
        return self.features[split]

    def image_dataset(self, samples: list[Sample], train: bool = False) -> SEMImageDataset:
        transform = self.train_transform if train and self.train_transform else self.transform
        return SEMImageDataset(samples, transform, self.decode_side, self.max_pixels)

    def loader(self, split: str, samples: list[Sample] | None = None, train=False) -> DataLoader:
        """Batches of a split (or of `samples`, named `split`): cached features or images."""
        samples = samples if samples is not None else self.samples[split]
        sampler = None
        if train and self.sampler == "balanced":
            # Every class drawn equally often: each image weighs 1 / (its class's count).
            counts = self.class_counts("train")
            weights = [1.0 / counts[s.label] for s in samples]
            sampler = WeightedRandomSampler(weights, num_samples=len(samples), replacement=True)
        shuffle = train and sampler is None
        # Page-locked batches copy to a GPU asynchronously; on CPU pinning is wasted work.
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # Augmented images change every epoch: no cached features for them.
        if self.use_cache and not (train and self.train_transform):
            # Rows of a memory-mapped matrix: cheaper to read in-process than to ship to workers.
            features = self.split_features(split, samples)
            dataset = FeatureDataset(features, [s.label for s in samples])
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=shuffle,
                sampler=sampler,
                pin_memory=on_gpu,
            )
        return DataLoader(
            self.image_dataset(samples, train),
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_gpu,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
