"""SEMDataModule: the loaders of a split manifest: cropped, transformed images, or a frozen
backbone's cached features."""

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from sem_cls.data.augment import sem_train_transform
from sem_cls.data.images import DEFAULT_MAX_PIXELS, check_max_pixels
from sem_cls.data.ingest import INGEST_VERSION
from sem_cls.data.manifest import SPLITS, SplitManifest
from sem_cls.data.samples import FeatureDataset, Sample, SEMImageDataset, eval_preprocessing
from sem_cls.data.workers import worker_init_fn
from sem_cls.errors import UserError

log = logging.getLogger(__name__)

SAMPLERS = ("none", "balanced")


class EpochSeeded:
    """A sampler whose draw in each epoch comes from its own generator, seeded with (seed,
    epoch) alone. The global generator is also drawn from by every new loader iterator (its
    workers' base seed), and a resumed run starts its workers anew where an uninterrupted one
    keeps them: shuffling from it, the epochs after a resume would see another order. Lightning
    calls `set_epoch` before every epoch (through its DistributedSampler under DDP)."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, generator=torch.Generator(), **kwargs)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class EpochShuffle(EpochSeeded, RandomSampler):
    """Every image once per epoch, in an order drawn from (seed, epoch)."""


class EpochBalancedDraw(EpochSeeded, WeightedRandomSampler):
    """Images drawn with replacement by weight, from (seed, epoch)."""


class SEMDataModule(L.LightningDataModule):
    """Loaders of the train/val/test images of a `SplitManifest`, and of further named test sets.

    The transform follows the backbone's own `data_config`. Given a `feature_extractor` (a
    frozen backbone's engine and feature cache, sem_cls.models.engines.FeatureExtractor), `setup`
    has it extract the features of every set the stage reads (once per image: see FeatureCache),
    and batches are {"features": (B, num_features), ...} instead of {"image": (B, 3, H, W), ...};
    both with "label" (B,) and "index" (B,), the images' places in their set.
    """

    def __init__(
        self,
        manifest: SplitManifest,
        data_config: dict,
        feature_extractor=None,
        batch_size: int = 32,
        num_workers: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sampler: str = "none",
        augment: dict | None = None,
        test_sets: dict[str, list[Sample]] | None = None,
        seed: int = 42,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise UserError(f"data.sampler={sampler!r} is not one of {list(SAMPLERS)}.")
        self.manifest = manifest
        self.data_config = dict(data_config)
        self.feature_extractor = feature_extractor
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_pixels = check_max_pixels(max_pixels)
        self.sampler = sampler
        self.seed = seed  # of each epoch's training order, with the epoch number
        # Training-time augmentation (sem_cls.data.augment); off: {} or None.
        self.augment = dict(augment or {})
        # The images of every set by name: the splits, then further test sets (eval.py's
        # external folders, as "external/<name>"). Each test set is a test pass of its own name.
        self.samples: dict[str, list[Sample]] = {name: manifest.samples(name) for name in SPLITS}
        self.samples.update(test_sets or {})
        self.test_set_names = ["test", *(test_sets or {})]
        self.features: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(
        cls,
        manifest: SplitManifest,
        data,
        data_config: dict,
        feature_extractor=None,
        test_sets: dict[str, list[Sample]] | None = None,
    ) -> "SEMDataModule":
        """The loaders of `manifest` with the loader settings of a `data` config, for a backbone
        of `data_config`, of cached features with a `feature_extractor`."""
        return cls(
            manifest,
            data_config,
            feature_extractor,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            max_pixels=data.max_pixels,
            sampler=data.sampler,
            augment=data.get("augment"),
            test_sets=test_sets,
            seed=data.seed,
        )

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def class_counts(self, split: str) -> np.ndarray:
        """Images per class in `split`, in class-index order."""
        labels = [sample.label for sample in self.samples[split]]
        return np.bincount(labels, minlength=len(self.class_names))

    def state_dict(self) -> dict:
        # Saved in every checkpoint, so evaluation can tell whether it sees the same split.
        return {"class_names": self.class_names, "split_fingerprint": self.manifest.fingerprint()}

    def setup(self, stage: str | None = None) -> None:
        """Transforms from the backbone's data config; with a feature extractor, the backbone's
        features of every set `stage` reads. Lightning runs this on every rank once DDP has
        started, so the ranks share the extraction."""
        # Frozen-backbone baseline: the evaluation transform (resize + centre crop) for every split.
        self.transform, self.decode_side = eval_preprocessing(self.data_config)
        self.train_transform = (
            sem_train_transform(self.data_config, **self.augment) if self.augment else None
        )
        if self.feature_extractor is None:
            log.info("Feature cache off: the backbone runs on every batch of every epoch.")
            return
        # Augmented images change every epoch: no cached features for them.
        sets = {
            "fit": ["val"] if self.train_transform else ["train", "val"],
            "validate": ["val"],
            "test": self.test_set_names,
        }
        for name in sets.get(stage, []):
            self.extract_features(name)

    def extract_features(self, name: str) -> np.ndarray:
        """The frozen backbone's features of set `name`, from the cache or extracted into it."""
        if name not in self.features:
            samples = self.samples[name]
            preprocessing = {
                "ingest": INGEST_VERSION,
                "decode_side": self.decode_side,
                "transform": repr(self.transform),
            }
            strategy = self.trainer.strategy if self.trainer is not None else None
            self.features[name] = self.feature_extractor.features(
                preprocessing,
                self.image_dataset(samples),
                # Content and crop: the same bytes cropped otherwise give other features.
                [f"{s.sha256}:{s.crop_box}" for s in samples],
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                # Under DDP the ranks share the extraction (each a slice of the images).
                strategy=strategy,
            )
            self.record_engine()
        return self.features[name]

    def record_engine(self) -> None:
        """The feature engine chosen, and why, as a tag of the run's MLflow run (a tag, not a
        param: a resumed run may choose otherwise on another machine)."""
        from lightning.pytorch.loggers import MLFlowLogger

        choice = self.feature_extractor.choice
        if self.trainer is None or not choice or not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.set_tag(logger.run_id, "feature_engine", choice)

    def image_dataset(self, samples: list[Sample], train: bool = False) -> SEMImageDataset:
        transform = self.train_transform if train and self.train_transform else self.transform
        return SEMImageDataset(samples, transform, self.decode_side, self.max_pixels)

    def loader(self, name: str, train=False) -> DataLoader:
        """Batches of set `name`: its cached features where setup() extracted them, else images."""
        samples = self.samples[name]
        sampler = None
        if train and self.sampler == "balanced":
            # Every class drawn equally often: each image weighs 1 / (its class's count).
            counts = self.class_counts("train")
            weights = [1.0 / counts[s.label] for s in samples]
            sampler = EpochBalancedDraw(weights, len(samples), replacement=True, seed=self.seed)
        elif train:
            sampler = EpochShuffle(samples, seed=self.seed)
        # The loader's own generator gives its workers their base seed: not drawn from the
        # global one, whose state the model's randomness (dropout, mixup) continues from on resume.
        generator = torch.Generator().manual_seed(self.seed)
        # Page-locked batches copy to a GPU asynchronously; on CPU pinning is wasted work.
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if self.feature_extractor is not None and not (train and self.train_transform):
            if name not in self.features:
                raise RuntimeError(f"setup() extracted no features of {name!r} for this stage.")
            # Rows of a memory-mapped matrix: cheaper to read in-process than to ship to workers.
            dataset = FeatureDataset(self.features[name], [s.label for s in samples])
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                sampler=sampler,
                generator=generator,
                pin_memory=on_gpu,
            )
        return DataLoader(
            self.image_dataset(samples, train),
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_gpu,
            worker_init_fn=worker_init_fn,  # workers end with this process; seeded as Lightning's
        )

    def unshuffled_loader(self, name: str) -> DataLoader:
        """Every item of set `name` once, in order, unaugmented: its extracted features, or its
        images under the evaluation transform. Drawn with a private generator, so reading it
        leaves the global RNG (which a resumed run restored) where it was."""
        if name in self.features:
            return self.loader(name)
        return DataLoader(
            self.image_dataset(self.samples[name]),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator(),
            worker_init_fn=worker_init_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        # One test pass per named set, told apart by Lightning's dataloader_idx.
        return [self.loader(name) for name in self.test_set_names]
