"""Multiruns: each job tagged in MLflow with its sweep, a summary when the sweep ends, and jobs
that can start processes under the joblib launcher.

Every job works out its sweep's id from its own config, so nothing is handed from the sweep to
jobs in other processes or on other machines, and nothing is left open if the sweep is killed.
"""

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sem_cls.tracking import experiment_for, sweep_id

log = logging.getLogger(__name__)

# Tag of the summary run; the jobs carry `sweep_id` instead, so a search for it finds jobs only.
SUMMARY_TAG = "sweep_summary_of"
SUMMARY_FILE = "sweep_summary.csv"


class SweepTracking(Callback):
    """Hydra callback around a multirun: creates the MLflow experiment before any job starts, and
    at the end writes every job's parameters and `metric` to sweep_summary.csv in the sweep
    folder, prints the best job, and logs the table on a summary run that the jobs nest under."""

    def __init__(self, metric: str | None, direction: str = "maximize"):
        self.metric = metric
        self.direction = getattr(direction, "name", direction)  # Optuna's enum, or a string

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Before any job: the jobs would wait on the store's lock in turn (sem_cls.tracking).
        mlflow_cfg = OmegaConf.select(config, "logger.mlflow")
        if mlflow_cfg is not None:
            experiment_for(mlflow_cfg)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        mlflow_cfg = OmegaConf.select(config, "logger.mlflow")
        if mlflow_cfg is None or self.metric is None:
            return
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

    from sem_cls.compare import runs_table

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
