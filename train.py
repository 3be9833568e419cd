"""Train an SEM image classifier: fit, test the best checkpoint, log it all to MLflow.

python train.py                                   # InceptionV3, frozen, on data/nffa
python train.py experiment=demo                   # built-in SEM-like data, runs anywhere
python train.py -m model.optimizer.lr=1e-3,3e-4   # a sweep, one MLflow run per job
python train.py resume=<run folder or MLflow run id>     # continue a killed run
python train.py reproduce=<run folder or MLflow run id>  # run a saved config again
"""

import logging
import math
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sem_cls.errors import UserError, check_command_line, exits_on_user_error  # noqa: E402
from sem_cls.registry import log_best_model, read_checkpoint  # noqa: E402
from sem_cls.resume import RUN_ID_FILE, last_checkpoint, saved_config  # noqa: E402
from sem_cls.runner import build_trainer  # noqa: E402
from sem_cls.tracking import log_run_context, mlflow_loggers, print_summary  # noqa: E402

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig, resume_from: Path | None = None) -> None:
    """Refuse values that would otherwise fail only after ingest, model building or the start
    of an MLflow run."""
    lr = OmegaConf.select(cfg, "model.optimizer.lr")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise UserError(f"model.optimizer.lr={lr} must be a positive number, e.g. 1e-3.")
    batch_size = cfg.data.batch_size
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UserError(f"data.batch_size={batch_size} must be a whole number of 1 or more.")
    checkpoint = resume_from and last_checkpoint(resume_from)
    if checkpoint:
        read_checkpoint(checkpoint, option=f"resume={resume_from}: checkpoint")


def train(cfg: DictConfig, resume_from: Path | None = None) -> dict[str, float]:
    """Fit and test as `cfg` says, continuing the run in `resume_from` if given; return the
    logged metrics."""
    from sem_cls.models.confidence import FitConfidence
    from sem_cls.runner import build_datamodule, split_data, train_class_counts

    check_config(cfg, resume_from)
    L.seed_everything(cfg.seed, workers=True)
    ingested, manifest = split_data(cfg.data)
    # The model config's keys, and what only the data knows (sem_cls.models.build).
    classifier = hydra.utils.instantiate(
        cfg.model,
        class_names=manifest.class_names,
        train_counts=train_class_counts(manifest),
        info_bar=cfg.data.info_bar,
        _convert_="all",
    )
    datamodule = build_datamodule(manifest, cfg.data, classifier.model)
    # Temperature every validation epoch; novelty references and threshold at the start.
    trainer = build_trainer(cfg, callbacks=[FitConfidence()])
    output_dir = Path(cfg.paths.output_dir)
    # Under DDP every rank runs this script; the run's files and MLflow records are rank 0's.
    if trainer.is_global_zero:
        hydra_dir = output_dir / ".hydra"
        log_run_context(trainer.loggers, cfg, manifest, ingested, hydra_dir, resume_from)
        for logger in mlflow_loggers(trainer.loggers):  # what resume= continues
            (output_dir / RUN_ID_FILE).write_text(logger.run_id)

    checkpoint = resume_from and last_checkpoint(resume_from)
    if resume_from:
        log.info("Continuing from %s", checkpoint or "the start: no checkpoint was saved")
    trainer.fit(classifier, datamodule, ckpt_path=checkpoint or None, weights_only=True)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the weights as they are now.")
        trainer.test(classifier, datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})

    if OmegaConf.select(cfg, "logger.mlflow.log_model", default=False):
        # runs:/<id>/model, and models:/<name>@<alias> with registry.name
        log_best_model(trainer, datamodule, cfg.get("registry"))
    print_summary(trainer.loggers, {k: v for k, v in metrics.items() if "/" in k}, cfg)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exits_on_user_error
def main(cfg: DictConfig) -> float | None:
    cfg, resume_from = saved_config(cfg, HydraConfig.get().overrides.task)
    metrics = train(cfg, resume_from)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    check_command_line(Path(__file__).resolve().parent / "conf", "train")
    main()
