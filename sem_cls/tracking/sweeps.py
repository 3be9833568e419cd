"""A sweep in MLflow: each job tagged with its sweep, and a summary run, the parent of the
jobs, with the table of every job when the sweep ends."""

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sem_cls.compat import mlflow_tracking_uri
from sem_cls.tracking.store import experiment_for
from sem_cls.tracking.summary import runs_table

log = logging.getLogger(__name__)

# Tag of the summary run; the jobs carry `sweep_id` instead, so a search for it finds jobs only.
SUMMARY_TAG = "sweep_summary_of"
SUMMARY_FILE = "sweep_summary.csv"


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
    every_experiment = [e.experiment_id for e in client.search_experiments()]
    with mlflow_tracking_uri(mlflow_cfg.tracking_uri):  # the process's URI left as it was
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
