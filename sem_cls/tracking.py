"""MLflow bookkeeping: the run's config, code version, data split and files."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from sem_cls.sweeps import sweep_tags


def mlflow_loggers(loggers) -> list[MLFlowLogger]:
    return [logger for logger in loggers if isinstance(logger, MLFlowLogger)]


def log_artifacts(loggers, paths: list[Path], artifact_path: str) -> None:
    for logger in mlflow_loggers(loggers):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


# The MLflow UI opens an experiment in the view its kind names; without the tag it guesses, and
# may open the GenAI (traces) view for these classifier runs.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def mark_model_training(logger: MLFlowLogger) -> None:
    """Tag the logger's experiment as model training, unless it already has a kind."""
    client, experiment_id = logger.experiment, logger.experiment_id
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


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


def write_environment(folder: Path) -> Path:
    """packages.txt: every installed distribution as name==version, as `pip freeze` lists them."""
    folder.mkdir(parents=True, exist_ok=True)
    packages = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()}, key=str.lower
    )
    lines = [f"# Python {platform.python_version()} on {platform.platform()}", *packages]
    (folder / "packages.txt").write_text("\n".join(lines) + "\n")
    return folder


def log_run_context(
    loggers, cfg: DictConfig, datamodule, hydra_dir: Path, resumed_from: Path | None = None
) -> None:
    """Config as params; git, package versions and split fingerprint as tags; .hydra/, manifest,
    ingest report and installed packages as files (also kept in the run's output folder)."""
    data_files = datamodule.write_data_files(Path(cfg.paths.output_dir) / "data")
    environment = write_environment(Path(cfg.paths.output_dir) / "environment")
    tags = {
        **git_state(Path(cfg.paths.root_dir)),
        "data_dir": str(datamodule.data_dir),
        "data_split_fingerprint": datamodule.split_fingerprint(),
        **{f"{name}_version": metadata.version(name) for name in ("torch", "lightning", "timm")},
        **sweep_tags(cfg),  # sweep_id, sweep_job, sweep_overrides in a multirun
    }
    for logger in mlflow_loggers(loggers):
        mark_model_training(logger)
        if resumed_from is None:  # a continued run has its params; MLflow refuses new values
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        else:
            logger.experiment.set_tag(logger.run_id, "resumed_from", str(resumed_from))
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        if hydra_dir.is_dir():  # absent when composed outside a Hydra run, as in tests
            logger.experiment.log_artifacts(logger.run_id, str(hydra_dir), "hydra")
        logger.experiment.log_artifacts(logger.run_id, str(data_files), "data")
        logger.experiment.log_artifacts(logger.run_id, str(environment), "environment")
