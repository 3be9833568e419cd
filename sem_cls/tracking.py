"""MLflow bookkeeping: the tracking store and experiment, made safely by processes started
together; the run's config, code version, data split and files."""

import hashlib
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from sem_cls.errors import UserError

STORE_LOCK_TIMEOUT_S = 300  # creating a store takes seconds; a longer wait is a hung process


def store_lock_file(tracking_uri: str) -> Path | None:
    """The lock file guarding the first use of a tracking store: beside a SQLite database, in
    the temp folder for other local stores and databases; None for a tracking server (it
    serializes its own set-up) and for an in-memory store."""
    uri = str(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return None
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        if not database or database == ":memory:":
            return None
        return Path(database).resolve().with_name(Path(database).name + ".lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sem-cls-mlflow-{digest}.lock"


@contextmanager
def store_lock(tracking_uri: str):
    """Held while a process first opens a tracking store and creates its experiment: processes
    started together would each set up a new SQLite database (MLflow's schema migration then
    fails in all but one: 'Online migration expected to match one row') or create the same
    experiment twice. The lock is the operating system's, so a killed holder releases it.
    Yields whether a lock is held (False for a tracking server)."""
    path = store_lock_file(tracking_uri)
    if path is None:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # One object per file in this process, so holding it again (nested) does not deadlock.
    lock = FileLock(path, timeout=STORE_LOCK_TIMEOUT_S, is_singleton=True)
    try:
        lock.acquire()
    except Timeout as err:
        raise UserError(
            f"Another process has held {path} for over {STORE_LOCK_TIMEOUT_S} s while setting "
            f"up the MLflow store {tracking_uri}. Find it (e.g. `fuser {path}`) and stop it, or "
            "point logger.mlflow.tracking_uri elsewhere."
        ) from err
    try:
        yield True
    finally:
        lock.release()


def tracking_client(tracking_uri: str):
    """An MlflowClient of `tracking_uri`; the store is opened (and created) under the lock."""
    import mlflow

    with store_lock(tracking_uri):
        return mlflow.MlflowClient(tracking_uri)


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created as Lightning's MLFlowLogger would create it if there
    is none. Call it under `store_lock`."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def experiment_for(mlflow_cfg: DictConfig):
    """The MLflow client and experiment id of a logger config, creating the experiment as the
    logger would, with the same artifact location."""
    location = mlflow_cfg.get("artifact_location")
    if str(mlflow_cfg.tracking_uri).startswith(("http://", "https://")):
        location = None  # as ContinuingMLFlowLogger: a tracking server keeps the files itself
    with store_lock(mlflow_cfg.tracking_uri):
        client = tracking_client(mlflow_cfg.tracking_uri)
        return client, ensure_experiment(client, mlflow_cfg.experiment_name, location)


def sweep_id(hydra_cfg: DictConfig, log_dir: str) -> str:
    """`optuna/<study>` for an Optuna search with storage (a resumed study is the same sweep);
    otherwise the sweep's output folder, relative to the log folder."""
    study = OmegaConf.select(hydra_cfg, "sweeper.study_name")
    if study and OmegaConf.select(hydra_cfg, "sweeper.storage"):
        return f"optuna/{study}"
    folder, logs = Path(hydra_cfg.sweep.dir).resolve(), Path(log_dir).resolve()
    return str(folder.relative_to(logs) if folder.is_relative_to(logs) else folder)


def sweep_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that put a multirun job with the rest of its sweep; none for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    return {
        "sweep_id": sweep_id(hydra_cfg, cfg.paths.log_dir),
        "sweep_job": str(hydra_cfg.job.num),
        "sweep_overrides": hydra_cfg.job.override_dirname,
    }


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
