"""Shared by train.py and eval.py: the data of a run (ingest -> manifest -> datamodule), the
Trainer and other objects from config."""

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from sem_cls.compat import reruns_command_line
from sem_cls.data.datamodule import SEMDataModule
from sem_cls.data.ingest import ingest_folder
from sem_cls.data.manifest import SplitManifest
from sem_cls.data.samples import Sample
from sem_cls.errors import UserError
from sem_cls.evaluation.callback import SplitScores
from sem_cls.models.engines import FeatureExtractor
from sem_cls.models.model import SEMModel
from sem_cls.tracking import run_callbacks

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Objects of every entry with a `_target_` in a config group such as callbacks or logger."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def split_data(data: DictConfig, resume_from: Path | None = None):
    """Every file of `data.data_dir` checked once (cached; bad ones left out) and the split
    manifest: a resumed run's own (its data/manifest.csv; images gone since left out, images
    added since not used), else `data.manifest` or a new split. The ingest result and the
    SplitManifest."""
    ingested = ingest_folder(data)
    saved = resume_from / "data" / "manifest.csv" if resume_from else None
    if saved is not None and saved.is_file():
        return ingested, SplitManifest.resumed(saved, ingested)
    return ingested, SplitManifest.from_config(data, ingested)


def train_class_counts(manifest: SplitManifest) -> np.ndarray:
    """Images per class of the training split, in class-index order."""
    labels = [sample.label for sample in manifest.samples("train")]
    return np.bincount(labels, minlength=len(manifest.class_names))


def build_datamodule(
    manifest: SplitManifest,
    data: DictConfig,
    model: SEMModel,
    tta: bool = False,
    test_sets: dict[str, list[Sample]] | None = None,
) -> SEMDataModule:
    """The loaders of `manifest` for `model`'s input, of its cached features where they do
    (a frozen backbone, no test-time augmentation, data.cache_features)."""
    extractor = None if tta else FeatureExtractor.from_config(data, model)
    return SEMDataModule.from_config(manifest, data, model.data_config, extractor, test_sets)


def build_trainer(cfg: DictConfig, callbacks: list | None = None):
    """The Lightning Trainer of `cfg.trainer` with the configured callbacks and loggers, what
    MLflow runs need (the run id in checkpoints, the reports as artifacts), the scoring of
    evaluation passes (SplitScores, unless the configured reports do it) and `callbacks`."""
    loggers = instantiate_group(cfg.get("logger"))
    configured = instantiate_group(cfg.get("callbacks"))
    if not any(isinstance(callback, SplitScores) for callback in configured):
        configured.insert(0, SplitScores())
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=configured + run_callbacks(loggers) + list(callbacks or []),
        logger=loggers or False,
    )
    _refuse_rerun_of_a_local_sweep(trainer)
    return trainer


def _refuse_rerun_of_a_local_sweep(trainer) -> None:
    """Lightning's `ddp` starts ranks 1.. by running the command line again, with Hydra's run
    dir set to rank 0's; in a multirun (-m) that command line is the whole sweep, which every
    rank would start over in folders of its own. SLURM or torchrun starting the ranks is fine."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if (
        reruns_command_line(trainer.strategy)
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise UserError(
            "trainer.strategy=ddp cannot run inside a local sweep (-m): Lightning would start "
            "the whole sweep again for every further device. Add trainer.strategy=ddp_spawn, "
            "run the trials one by one, or sweep with hydra/launcher=slurm, where SLURM starts "
            "each rank."
        )
