"""A training run in MLflow: its config, code version, data split and files, the callbacks
that add its checkpoint's run id and report files, and its status when it cannot finish."""

import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from lightning import Callback
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from sem_cls.data.ingest import write_data_files
from sem_cls.tracking.logger import mlflow_loggers
from sem_cls.tracking.store import tracking_client
from sem_cls.tracking.sweeps import sweep_tags

log = logging.getLogger(__name__)


def log_artifacts(loggers, paths: list[Path], artifact_path: str) -> None:
    for logger in mlflow_loggers(loggers):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def set_tags(loggers, tags: dict[str, str]) -> None:
    for logger in mlflow_loggers(loggers):
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)


class RunIdInCheckpoints(Callback):
    """Puts the MLflow run id in every checkpoint: eval.py links its results to the training run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in mlflow_loggers(trainer.loggers):
            checkpoint["mlflow_run_id"] = logger.run_id


class ReportArtifacts(Callback):
    """Logs the report files that EvaluationReports writes to the MLflow run, as
    `reports/<split>/<file>`, when each fit or test is over: the files new or changed since it
    began (a report folder may hold files of an earlier pass, or ones logged otherwise)."""

    def __init__(self):
        self.before: dict[Path, tuple[int, int]] = {}

    @staticmethod
    def _report_files(trainer) -> dict[Path, tuple[Path, tuple[int, int]]]:
        from sem_cls.evaluation.callback import EvaluationReports  # not at the top: compare

        files = {}
        for callback in trainer.callbacks:
            if isinstance(callback, EvaluationReports) and callback.output_dir.is_dir():
                for path in callback.output_dir.rglob("*"):
                    if path.is_file():
                        stat = path.stat()
                        files[path] = (callback.output_dir, (stat.st_mtime_ns, stat.st_size))
        return files

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.before = {path: stamp for path, (_, stamp) in self._report_files(trainer).items()}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:  # the reports are rank 0's
            return
        for path, (reports_dir, stamp) in sorted(self._report_files(trainer).items()):
            if self.before.get(path) != stamp:
                folder = path.parent.relative_to(reports_dir).as_posix()
                log_artifacts(trainer.loggers, [path], f"reports/{folder}")


def run_callbacks(loggers) -> list[Callback]:
    """The Trainer callbacks that the MLflow runs of `loggers` need; none without MLflow."""
    return [RunIdInCheckpoints(), ReportArtifacts()] if mlflow_loggers(loggers) else []


# The MLflow UI opens an experiment in the view its kind names; without the tag it guesses, and
# may open the GenAI (traces) view for these classifier runs.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def mark_model_training(logger: MLFlowLogger) -> None:
    """Tag the logger's experiment as model training, unless it already has a kind."""
    client, experiment_id = logger.experiment, logger.experiment_id
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def git_state(repo_dir: Path) -> dict[str, str]:
    """Commit and dirty flag of the code that ran, under MLflow's own tag names (the UI shows the
    commit with the run); 'unknown' outside a git checkout. MLflow tags the commit itself only
    when the script that started the process is in a checkout, not for a run started in-process
    (a notebook, the tests): this one is the project's checkout's, always."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {MLFLOW_GIT_COMMIT: "unknown", MLFLOW_GIT_DIRTY: "unknown"}
    return {MLFLOW_GIT_COMMIT: commit, MLFLOW_GIT_DIRTY: str(dirty).lower()}


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
    loggers,
    cfg: DictConfig,
    manifest,
    ingested,
    hydra_dir: Path,
    resumed_from: Path | None = None,
) -> None:
    """Config as params; git, package versions and split fingerprint as tags; .hydra/, manifest,
    ingest report and installed packages as files (also kept in the run's output folder).

    A resumed run (`resumed_from`) is the same run: it gets the tag `resumed_from` and nothing
    else, so its split fingerprint, manifest and the record of how it started stay as they were.
    """
    if resumed_from is not None:
        for logger in mlflow_loggers(loggers):
            logger.experiment.set_tag(logger.run_id, "resumed_from", str(resumed_from))
        return
    data_files = write_data_files(Path(cfg.paths.output_dir) / "data", manifest, ingested)
    environment = write_environment(Path(cfg.paths.output_dir) / "environment")
    loggers = mlflow_loggers(loggers)
    if not loggers:  # untracked: the files above are the record (and MLflow is not imported)
        return
    tags = {
        **git_state(Path(cfg.paths.root_dir)),
        "data_dir": str(manifest.root),
        "data_split_fingerprint": manifest.fingerprint(),
        **{f"{name}_version": metadata.version(name) for name in ("torch", "lightning", "timm")},
        **sweep_tags(cfg),  # sweep_id, sweep_job, sweep_overrides in a multirun
    }
    for logger in loggers:
        mark_model_training(logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        if hydra_dir.is_dir():  # absent when composed outside a Hydra run, as in tests
            logger.experiment.log_artifacts(logger.run_id, str(hydra_dir), "hydra")
        logger.experiment.log_artifacts(logger.run_id, str(data_files), "data")
        logger.experiment.log_artifacts(logger.run_id, str(environment), "environment")


def run_status(tracking_uri: str, run_id: str) -> str | None:
    """The status of an MLflow run (RUNNING, FINISHED, FAILED, KILLED), None if unreadable."""
    import mlflow

    try:
        return tracking_client(tracking_uri).get_run(run_id).info.status
    except (OSError, mlflow.exceptions.MlflowException):
        return None


def end_run(tracking_uri: str, run_id: str, status: str, status_before: str | None = None) -> None:
    """End an MLflow run that did not finish: FAILED where it is still RUNNING; KILLED where it
    is RUNNING or was marked otherwise since `status_before` (FAILED by Lightning's exception
    handling, FINISHED by its SLURM requeue handler), not a finished run that a stopped resume
    never reopened. No run stays RUNNING after its process is gone. Called while a run is
    failing, so a store that cannot be written (full disk) is named in the log, not raised."""
    import mlflow

    try:
        client = tracking_client(tracking_uri)
        current = client.get_run(run_id).info.status
        if current == "RUNNING" or (status == "KILLED" and current != status_before):
            client.set_terminated(run_id, status)
    except (OSError, mlflow.exceptions.MlflowException) as err:
        log.error(
            "MLflow run %s in %s could not be marked %s: %s", run_id, tracking_uri, status, err
        )


def find_run(run_id: str, tracking_uri: str):
    """The MLflow run of `run_id` in `tracking_uri`, or None where there is none."""
    import mlflow

    try:
        return tracking_client(tracking_uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
