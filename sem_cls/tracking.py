"""MLflow bookkeeping: the run's config, code version, data split and files."""

import subprocess
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf


def mlflow_loggers(loggers) -> list[MLFlowLogger]:
    return [logger for logger in loggers if isinstance(logger, MLFlowLogger)]


def log_artifacts(loggers, paths: list[Path], artifact_path: str) -> None:
    for logger in mlflow_loggers(loggers):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def git_state(repo_dir: Path) -> dict[str, str]:
    """Commit and dirty flag of the code that ran; 'unknown' outside a git checkout."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def log_run_context(loggers, cfg: DictConfig, datamodule, hydra_dir: Path) -> None:
    """Config as params; git and split fingerprint as tags; .hydra/, manifest and ingest report
    as files (also kept in the run's output folder, under data/)."""
    data_files = datamodule.write_data_files(Path(cfg.paths.output_dir) / "data")
    tags = {
        **git_state(Path(cfg.paths.root_dir)),
        "data_dir": str(datamodule.data_dir),
        "data_split_fingerprint": datamodule.split_fingerprint(),
    }
    for logger in mlflow_loggers(loggers):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        if hydra_dir.is_dir():  # absent when composed outside a Hydra run, as in tests
            logger.experiment.log_artifacts(logger.run_id, str(hydra_dir), "hydra")
        logger.experiment.log_artifacts(logger.run_id, str(data_files), "data")
