"""Train an SEM image classifier: fit, test the best checkpoint, log it all to MLflow.

python train.py                                   # InceptionV3, frozen, on data/nffa
python train.py experiment=demo                   # built-in SEM-like data, runs anywhere
python train.py -m model.optimizer.lr=1e-3,3e-4   # a sweep, one MLflow run per job
python train.py resume=<run folder or MLflow run id>     # continue a killed run
python train.py reproduce=<run folder or MLflow run id>  # run a saved config again
"""

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

# Only Hydra and the config schema at the top: a refused command line answers in a second.
# torch, Lightning, timm and MLflow are imported by train(), after the config was checked.
import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sem_cls.config.schema import check_config  # noqa: E402
from sem_cls.errors import exits_on_user_error, run_command  # noqa: E402

log = logging.getLogger(__name__)


def train(cfg: DictConfig, resume_from: Path | None = None) -> dict[str, float]:
    """Fit and test as `cfg` says, continuing the run in `resume_from` if given; return the
    logged metrics."""
    import lightning as L

    from sem_cls.models.confidence import FitConfidence
    from sem_cls.registry import log_best_model
    from sem_cls.resume import RUN_ID_FILE, last_checkpoint
    from sem_cls.runner import build_datamodule, build_trainer, split_data, train_class_counts
    from sem_cls.stopping import stop_if_signalled
    from sem_cls.tracking import log_run_context, mlflow_loggers, print_summary

    L.seed_everything(cfg.seed, workers=True)
    # Every file checked once (cached; bad ones left out), and the split: a resumed run's own,
    # data.manifest, or a new one.
    ingested, manifest = split_data(cfg.data, resume_from)
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
        output_dir.mkdir(parents=True, exist_ok=True)
        for logger in mlflow_loggers(trainer.loggers):  # what resume= continues; first, so a
            (output_dir / RUN_ID_FILE).write_text(logger.run_id)  # failure ends it FAILED
        hydra_dir = output_dir / ".hydra"
        log_run_context(trainer.loggers, cfg, manifest, ingested, hydra_dir, resume_from)

    checkpoint = resume_from and last_checkpoint(resume_from)
    if resume_from:
        log.info("Continuing from %s", checkpoint or "the start: no checkpoint was saved")
    trainer.fit(classifier, datamodule, ckpt_path=checkpoint or None, weights_only=True)
    stop_if_signalled()  # Lightning leaves a signal in the last batch to its caller
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the weights as they are now.")
        trainer.test(classifier, datamodule, ckpt_path=best or None, weights_only=True)
        stop_if_signalled()
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})

    if OmegaConf.select(cfg, "logger.mlflow.log_model", default=False):
        # runs:/<id>/model, and models:/<name>@<alias> with registry.name
        log_best_model(trainer, datamodule, cfg.get("registry"), cfg.data.get("engine_dir"))
    print_summary(trainer.loggers, {k: v for k, v in metrics.items() if "/" in k}, cfg)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exits_on_user_error
def main(cfg: DictConfig) -> float | None:
    # Hydra composed cfg and checked it (sem_cls.config.schema.ConfigCheck) before this runs.
    from sem_cls.data.ingest import require_data_folder

    resume_from = None
    if cfg.get("resume") or cfg.get("reproduce"):
        from sem_cls.registry import read_checkpoint
        from sem_cls.resume import last_checkpoint, saved_config

        cfg, resume_from = saved_config(cfg, HydraConfig.get().overrides.task)
        check_config(cfg)  # the saved config, with this command line's values on top
        checkpoint = resume_from and last_checkpoint(resume_from)
        if checkpoint:
            read_checkpoint(checkpoint, option=f"resume={resume_from}: checkpoint")
    require_data_folder(cfg.data)  # before torch and Lightning load
    from sem_cls.stopping import ends_recorded

    with ends_recorded(cfg):  # a signal or error ends the MLflow run KILLED or FAILED
        metrics = train(cfg, resume_from)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    if any(arg.startswith("resume=") for arg in sys.argv[1:]):
        # resume=: Hydra's record and the log go to the run's own folder.
        from sem_cls.resume import resume_hydra_overrides

        sys.argv += exits_on_user_error(resume_hydra_overrides)(
            Path(__file__).resolve().parent / "conf", "train", sys.argv[1:]
        )
    run_command(main)
