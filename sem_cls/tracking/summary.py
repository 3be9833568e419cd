"""What a person reads of the runs: the summary a run prints when it ends, and the table of
runs, best first, that sweeps and `sem_cls.compare` print."""

import pandas as pd
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sem_cls.tracking.logger import mlflow_loggers
from sem_cls.tracking.store import is_tracking_server


@rank_zero_only  # once per run, not once per DDP rank
def print_summary(loggers, metrics: dict, cfg: DictConfig) -> None:
    """Where the run is, its main figures, and how to look at it in the MLflow UI."""
    lines = [f"{name} = {float(value):.4f}" for name, value in sorted(metrics.items())]
    for logger in mlflow_loggers(loggers):
        client = logger.experiment
        uri = client.tracking_uri
        ui = "  open the UI with `make ui`, then http://127.0.0.1:5000"
        if is_tracking_server(uri):
            ui = f"  open the UI at {uri}"  # a tracking server is its own UI
        experiment = client.get_experiment(logger.experiment_id).name
        lines += [
            f"MLflow run {logger.run_id} in experiment '{experiment}'",
            f"  tracking URI: {uri}",
            ui,
        ]
    lines.append(f"Output folder: {cfg.paths.output_dir}")
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
