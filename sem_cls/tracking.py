"""MLflow bookkeeping, the one module that talks to MLflow about runs: the tracking store and
experiment, made safely by processes started together; the logger, the run's config, code
version, data split and files, run lookup, sweep tags and summaries, runs tables."""

import hashlib
import logging
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sem_cls.data.ingest import write_data_files
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


def sweep_job(hydra_cfg: DictConfig) -> str:
    """The job's number in its sweep: in an Optuna search, its trial number in the study, which
    the sweeper gives the job as its folder (hydra_plugins/); otherwise Hydra's job number.
    Hydra numbers jobs per process: two searches on one study would repeat its numbers."""
    if OmegaConf.select(hydra_cfg, "sweeper.study_name"):
        return str(hydra_cfg.sweep.subdir)
    return str(hydra_cfg.job.num)


def sweep_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that put a multirun job with the rest of its sweep; none for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    return {
        "sweep_id": sweep_id(hydra_cfg, cfg.paths.log_dir),
        "sweep_job": sweep_job(hydra_cfg),
        "sweep_overrides": hydra_cfg.job.override_dirname,
    }


log = logging.getLogger(__name__)


def mlflow_loggers(loggers) -> list[MLFlowLogger]:
    return [logger for logger in loggers if isinstance(logger, MLFlowLogger)]


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
    commit with the run); 'unknown' outside a git checkout."""

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
    tags = {
        **git_state(Path(cfg.paths.root_dir)),
        "data_dir": str(manifest.root),
        "data_split_fingerprint": manifest.fingerprint(),
        **{f"{name}_version": metadata.version(name) for name in ("torch", "lightning", "timm")},
        **sweep_tags(cfg),  # sweep_id, sweep_job, sweep_overrides in a multirun
    }
    for logger in mlflow_loggers(loggers):
        mark_model_training(logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        if hydra_dir.is_dir():  # absent when composed outside a Hydra run, as in tests
            logger.experiment.log_artifacts(logger.run_id, str(hydra_dir), "hydra")
        logger.experiment.log_artifacts(logger.run_id, str(data_files), "data")
        logger.experiment.log_artifacts(logger.run_id, str(environment), "environment")


class ContinuingMLFlowLogger(MLFlowLogger):
    """MLFlowLogger that, continuing an existing run (`run_id`), leaves out metric values the
    run already holds for a step: epochs replayed after a kill are not recorded twice.

    With a tracking server (http:// or https:// URI) `artifact_location` is ignored: the server
    keeps artifacts where it was told to (`mlflow server --artifacts-destination`), and a local
    path here would exist on this machine only.
    """

    def __init__(self, *args, run_id: str | None = None, **kwargs):
        uri = str(kwargs.get("tracking_uri"))
        if uri.startswith(("http://", "https://")):
            kwargs["artifact_location"] = None
        stand_in = rank_zero_only.rank > 0 and uri.startswith("sqlite:")
        if stand_in:
            # DDP ranks > 0 never write to MLflow (Lightning hands them a dummy experiment), but
            # MLFlowLogger opens its store at once; ranks started together (srun, torchrun)
            # would all set up a new SQLite file at the same moment, and the schema setup of
            # one fails. They get a store of their own in memory instead.
            kwargs["tracking_uri"] = "sqlite:///:memory:"
        if stand_in:
            super().__init__(*args, run_id=run_id, **kwargs)
            self._tracking_uri = uri  # what the run is tracked in, by rank 0
        else:
            # The store is opened and the experiment made here, under the store's lock, not
            # lazily by Lightning, where runs started together would race to create them. A
            # tracking server needs no lock and is first reached when the run starts, as before.
            with store_lock(uri) as locked:
                super().__init__(*args, run_id=run_id, **kwargs)
                if locked and run_id is None:
                    ensure_experiment(
                        self._mlflow_client, self._experiment_name, self._artifact_location
                    )
        self._recorded: dict[str, set[int]] | None = {} if run_id is None else None

    def _recorded_steps(self) -> dict[str, set[int]]:
        if self._recorded is None:
            run = self.experiment.get_run(self.run_id)
            self._recorded = {
                key: {m.step for m in self.experiment.get_metric_history(self.run_id, key)}
                for key in run.data.metrics
            }
        return self._recorded

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        recorded = self._recorded_steps()
        fresh = {k: v for k, v in metrics.items() if (step or 0) not in recorded.get(k, ())}
        if fresh:
            super().log_metrics(fresh, step)


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


@rank_zero_only  # once per run, not once per DDP rank
def print_summary(loggers, metrics: dict, cfg: DictConfig) -> None:
    """Where the run is, its main figures, and how to look at it in the MLflow UI."""
    lines = [f"{name} = {float(value):.4f}" for name, value in sorted(metrics.items())]
    for logger in mlflow_loggers(loggers):
        uri = logger._tracking_uri
        ui = "  open the UI with `make ui`, then http://127.0.0.1:5000"
        if str(uri).startswith(("http://", "https://")):
            ui = f"  open the UI at {uri}"  # a tracking server is its own UI
        lines += [
            f"MLflow run {logger.run_id} in experiment '{logger._experiment_name}'",
            f"  tracking URI: {uri}",
            ui,
        ]
    lines.append(f"Output folder: {cfg.paths.output_dir}")
    print("\n" + "\n".join(lines))


# Sweeps: each job tagged with its sweep, and a summary run when the sweep ends.
# Tag of the summary run; the jobs carry `sweep_id` instead, so a search for it finds jobs only.
SUMMARY_TAG = "sweep_summary_of"
SUMMARY_FILE = "sweep_summary.csv"


def summarize_sweep(
    mlflow_cfg: DictConfig,
    sweep: str,
    sweep_dir: Path,
    metric: str,
    direction: str,
    swept: list[str] = (),
):
    """Table of the sweep's runs, best first (the swept keys, then any other params that differ),
    written to `sweep_dir` and logged on the sweep's summary run."""
    import mlflow

    client, experiment_id = experiment_for(mlflow_cfg)
    mlflow.set_tracking_uri(mlflow_cfg.tracking_uri)
    every_experiment = [e.experiment_id for e in client.search_experiments()]
    runs = mlflow.search_runs(every_experiment, filter_string=f"tags.sweep_id = '{sweep}'")
    if runs.empty:
        log.warning("No MLflow run is tagged sweep_id=%s; no sweep summary.", sweep)
        return None
    # Ties go to the earlier job, as Optuna's best trial does.
    runs = runs.assign(job=runs["tags.sweep_job"].astype(int)).sort_values("job")
    table = runs_table(runs, metric, direction, first=swept)
    table.insert(0, "job", runs.loc[table.index, "job"])
    table["overrides"] = runs.loc[table.index, "tags.sweep_overrides"]
    table = table.reset_index(drop=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path = sweep_dir / SUMMARY_FILE
    table.to_csv(csv_path, index=False)

    summary_id = summary_run(client, experiment_id, sweep)
    for path in (csv_path, sweep_dir / "optimization_results.yaml"):  # the latter: Optuna's
        if path.is_file():
            client.log_artifact(summary_id, str(path))
    best = table.iloc[0]
    if best[metric] == best[metric]:  # not NaN: at least one job reported the metric
        client.log_metric(summary_id, f"best/{metric}", float(best[metric]))
        client.set_tag(summary_id, "sweep_best_run_id", best["run_id"])
    for run_id in table["run_id"]:  # the MLflow UI shows the jobs nested under the summary
        client.set_tag(run_id, "mlflow.parentRunId", summary_id)
    client.set_terminated(summary_id)
    print_best(table, sweep, metric, direction, [k for k in swept if k in table], csv_path)
    return table


def summary_run(client, experiment_id: str, sweep: str) -> str:
    """The summary run of `sweep`, opened again when a resumed sweep ends a second time."""
    found = client.search_runs([experiment_id], filter_string=f"tags.{SUMMARY_TAG} = '{sweep}'")
    if found:
        return found[0].info.run_id
    tags = {SUMMARY_TAG: sweep, "mlflow.runName": f"sweep {sweep}"}
    return client.create_run(experiment_id, tags=tags).info.run_id


def print_best(table, sweep: str, metric: str, direction: str, swept: list[str], csv_path: Path):
    best = table.iloc[0]
    chosen = " ".join(f"{name}={best[name]}" for name in swept)
    lines = [
        f"Sweep {sweep}: {len(table)} runs; best {metric} = {best[metric]:.4f} ({direction})",
        f"  best parameters: {chosen or best['overrides']}",
        f"  job {best['job']}, MLflow run {best['run_id']}, overrides: {best['overrides']}",
        f"  every run: {csv_path}",
    ]
    print("\n" + "\n".join(lines))


def differing_params(runs: pd.DataFrame) -> list[str]:
    """The `params.*` columns whose values differ between runs, leaving out the folders each run
    wrote to (under its own paths/output_dir): they always differ and say nothing of the setting."""
    out_dirs = runs.get("params.paths/output_dir", pd.Series(index=runs.index, dtype=object))
    columns = []
    for column in sorted(c for c in runs.columns if c.startswith("params.")):
        values = runs[column]
        if values.nunique(dropna=False) < 2:
            continue
        own_folder = [
            isinstance(out, str) and value.startswith(out)
            for value, out in zip(values, out_dirs, strict=True)
            if isinstance(value, str)
        ]
        if not all(own_folder):
            columns.append(column)
    return columns


def runs_table(
    runs: pd.DataFrame, metric: str, direction: str = "maximize", first: list[str] = ()
) -> pd.DataFrame:
    """One row per run of an `mlflow.search_runs` frame, best `metric` first (runs without it
    last, ties in the frame's order), keeping the frame's index: the metric, the params in
    `first` and then the others that differ (named as overrides: `model.optimizer.lr`), status,
    run id and sweep id."""
    column = f"metrics.{metric}"
    values = runs[column] if column in runs else pd.Series(float("nan"), index=runs.index)
    order = values.sort_values(ascending=direction == "minimize", na_position="last", kind="stable")
    runs = runs.loc[order.index]
    table = pd.DataFrame({metric: order})
    chosen = [f"params.{key.replace('.', '/')}" for key in first]
    for param in dict.fromkeys([*chosen, *differing_params(runs)]):
        if param in runs:
            table[param.removeprefix("params.").replace("/", ".")] = runs[param]
    table["status"] = runs["status"]
    table["run_id"] = runs["run_id"]
    table["sweep_id"] = runs.get("tags.sweep_id")
    return table
