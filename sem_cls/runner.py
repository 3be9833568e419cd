"""Shared by train.py and eval.py: objects from config, user errors, the closing summary."""

import functools
import logging
import sys

import hydra
from omegaconf import DictConfig

from sem_cls.errors import UserError
from sem_cls.tracking import mlflow_loggers

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
    """The Lightning Trainer of `cfg.trainer` with the configured callbacks and loggers."""
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )


def _user_error_in(err: BaseException | None) -> UserError | None:
    """The UserError behind `err`; hydra.utils.instantiate wraps what a constructor raises."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


def exits_on_user_error(task):
    """A UserError ends the program with its message and exit code 2, not a traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        try:
            return task(cfg)
        except Exception as err:
            user_error = _user_error_in(err)
            if user_error is None:
                raise
            log.debug("User error", exc_info=True)
            print(f"\nError: {user_error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def print_summary(loggers, metrics: dict, cfg: DictConfig) -> None:
    """Where the run is, its main figures, and how to look at it in the MLflow UI."""
    lines = [f"{name} = {float(value):.4f}" for name, value in sorted(metrics.items())]
    for logger in mlflow_loggers(loggers):
        lines += [
            f"MLflow run {logger.run_id} in experiment '{logger._experiment_name}'",
            f"  tracking URI: {logger._tracking_uri}",
            "  open the UI with `make ui`, then http://127.0.0.1:5000",
        ]
    lines.append(f"Output folder: {cfg.paths.output_dir}")
    print("\n" + "\n".join(lines))
