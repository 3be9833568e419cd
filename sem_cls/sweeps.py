"""Multiruns: Hydra callbacks that create the MLflow experiment before the jobs, summarize the
sweep when it ends (both through sem_cls.tracking, which also tags each job with its sweep), and
let jobs start processes under the joblib launcher.

Every job works out its sweep's id from its own config, so nothing is handed from the sweep to
jobs in other processes or on other machines, and nothing is left open if the sweep is killed.
"""

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class SweepTracking(Callback):
    """Hydra callback around a multirun: creates the MLflow experiment before any job starts, and
    at the end writes every job's parameters and `metric` to sweep_summary.csv in the sweep
    folder, prints the best job, and logs the table on a summary run that the jobs nest under."""

    def __init__(self, metric: str | None, direction: str = "maximize"):
        self.metric = metric
        self.direction = getattr(direction, "name", direction)  # Optuna's enum, or a string

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Parallel jobs that find no database or no experiment each create it; SQLite then sees
        # two schema migrations at once, and all but one job fail. One creation, before any.
        mlflow_cfg = OmegaConf.select(config, "logger.mlflow")
        if mlflow_cfg is not None:
            # Imported here: Hydra builds its callbacks for every run, even one refused at once,
            # and sem_cls.tracking imports Lightning, which predict and the page never need.
            from sem_cls.tracking import experiment_for

            experiment_for(mlflow_cfg)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        mlflow_cfg = OmegaConf.select(config, "logger.mlflow")
        if mlflow_cfg is None or self.metric is None:
            return
        from sem_cls.tracking import summarize_sweep, sweep_id

        summarize_sweep(
            mlflow_cfg,
            sweep_id(config.hydra, config.paths.log_dir),
            Path(config.hydra.sweep.dir),
            self.metric,
            self.direction,
            swept_keys(config),
        )


class PlatformStartMethod(Callback):
    """Hydra callback: each job starts its processes the platform's way. In a joblib launcher's
    worker, multiprocessing's default is loky's, whose processes torch's DataLoader cannot start
    ('Process' object has no attribute 'env'), so data.num_workers > 0 would fail there."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        import multiprocessing

        if multiprocessing.get_start_method(allow_none=True) == "loky":
            multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys the sweep varies: sweeps on the command line (`lr=1e-3,3e-4`) and the
    sweeper's `params` (Optuna's search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments += [f"{key}={value}" for key, value in params.items()]
    overrides = OverridesParser.create().parse_overrides(arguments)
    return list(dict.fromkeys(o.key_or_group for o in overrides if o.is_sweep_override()))
