"""Shared by train.py and eval.py: the Trainer and other objects from config."""

import logging

import hydra
from omegaconf import DictConfig

from sem_cls.errors import UserError
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


def build_trainer(cfg: DictConfig):
    """The Lightning Trainer of `cfg.trainer` with the configured callbacks and loggers, and
    what MLflow runs need (the run id in checkpoints, the reports as artifacts)."""
    loggers = instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")) + run_callbacks(loggers),
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
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and launcher.num_processes > 1
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise UserError(
            "trainer.strategy=ddp cannot run inside a local sweep (-m): Lightning would start "
            "the whole sweep again for every further device. Add trainer.strategy=ddp_spawn, "
            "run the trials one by one, or sweep with hydra/launcher=slurm, where SLURM starts "
            "each rank."
        )
