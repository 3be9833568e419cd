"""Train an SEM image classifier: fit, test the best checkpoint, log it all to MLflow.

python train.py                                   # InceptionV3, frozen, on data/nffa
python train.py experiment=demo                   # built-in SEM-like data, runs anywhere
python train.py -m model.optimizer.lr=1e-3,3e-4   # a sweep, one MLflow run per job
"""

import logging
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sem_cls.runner import build_trainer, exits_on_user_error, print_summary  # noqa: E402
from sem_cls.tracking import log_run_context  # noqa: E402

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as `cfg` says; return the logged metrics."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    model = hydra.utils.instantiate(cfg.model, class_names=datamodule.class_names, _convert_="all")
    datamodule.attach_model(model)
    trainer = build_trainer(cfg)
    log_run_context(trainer.loggers, cfg, datamodule, Path(cfg.paths.output_dir, ".hydra"))

    trainer.fit(model, datamodule=datamodule)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the weights as they are now.")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})

    print_summary(trainer.loggers, {k: v for k, v in metrics.items() if "/" in k}, cfg)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exits_on_user_error
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
