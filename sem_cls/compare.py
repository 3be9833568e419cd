"""The top runs of an MLflow experiment as a terminal table, best first.

python -m sem_cls.compare [experiment=sem-cls-demo] [metric=val/acc_best] [top=10]
                          [sweep=<sweep_id>] [direction=maximize|minimize] [key=value ...]

Columns: the metric, the parameters whose values differ between the runs, status, run id and
sweep id. `experiment` is an MLflow experiment name or an experiment config (`demo`); without
it, the experiment of the most recent run. Other key=value pairs override conf/train.yaml, from
which the tracking URI (`paths.mlruns_dir=...`) and the default metric (`optimized_metric`) come.
"""

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sem_cls.config.schema import check_config
from sem_cls.errors import UserError, exits_on_user_error
from sem_cls.tracking.store import store_not_created

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"experiment": None, "metric": None, "top": "10", "sweep": None, "direction": "maximize"}


def train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml as train.py composes it, for the tracking URI and the default metric."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def find_experiment(client, name: str | None, overrides: list[str]):
    """The MLflow experiment called `name`, or the one of an experiment config of that name, or
    (no name) the one holding the most recent run."""
    if name is None:
        latest = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not latest:
            raise UserError(f"No run in {client.tracking_uri}; train one first (make demo).")
        return client.get_experiment(latest[0].info.experiment_id)
    experiment = client.get_experiment_by_name(name)
    if experiment is None and (ROOT / "conf" / "experiment" / f"{name}.yaml").is_file():
        cfg = train_config([*overrides, f"experiment={name}"])
        experiment = client.get_experiment_by_name(cfg.logger.mlflow.experiment_name)
    if experiment is None:
        known = ", ".join(e.name for e in client.search_experiments())
        raise UserError(f"No MLflow experiment '{name}' in {client.tracking_uri}. Known: {known}.")
    return experiment


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """This tool's options, and the rest as overrides of conf/train.yaml."""
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key, equals, value = arg.partition("=")
        if not equals:
            raise UserError(f"'{arg}' is not key=value; e.g. metric=val/acc_best top=5.")
        if key in options:
            options[key] = value
        else:
            overrides.append(arg)
    if options["direction"] not in ("maximize", "minimize"):
        raise UserError(f"direction={options['direction']}: give maximize or minimize.")
    if not options["top"].isdigit():
        raise UserError(f"top={options['top']}: give a number of runs.")
    return options, overrides


def compare(argv: list[str]) -> "pd.DataFrame":
    options, overrides = parse(argv)
    cfg = train_config(overrides)
    check_config(cfg)
    uri = cfg.logger.mlflow.tracking_uri
    if store_not_created(uri):  # refused in a second, without creating the store
        raise UserError(f"No run in {uri}; train one first (make demo).")
    # MLflow and pandas only for a command line that was not refused.
    import mlflow

    from sem_cls.compat import mlflow_tracking_uri
    from sem_cls.tracking import SUMMARY_TAG, runs_table, tracking_client

    metric = options["metric"] or cfg.optimized_metric
    client = tracking_client(uri)
    experiment = find_experiment(client, options["experiment"], overrides)
    sweep = options["sweep"]
    with mlflow_tracking_uri(uri):  # this store for the search, the process's URI left alone
        runs = mlflow.search_runs(
            [experiment.experiment_id], filter_string=f"tags.sweep_id = '{sweep}'" if sweep else ""
        )
    if f"tags.{SUMMARY_TAG}" in runs:  # a sweep's summary run is not a run to rank
        runs = runs[runs[f"tags.{SUMMARY_TAG}"].isna()]
    if runs.empty:
        where = f" of sweep {sweep}" if sweep else ""
        raise UserError(f"No runs in experiment '{experiment.name}'{where}.")
    metrics = runs.filter(like="metrics.").dropna(axis="columns", how="all")
    if f"metrics.{metric}" not in metrics:
        known = sorted(c.removeprefix("metrics.") for c in metrics)
        raise UserError(f"No run of '{experiment.name}' has the metric {metric}. Known: {known}.")
    runs = runs.sort_values("start_time", kind="stable")  # ties: the earlier run first
    table = runs_table(runs, metric, options["direction"]).head(int(options["top"]))
    print(
        f"Experiment '{experiment.name}' ({uri}): top {len(table)} of {len(runs)} runs"
        f" by {metric} ({options['direction']})\n"
    )
    print(table.to_string(index=False, na_rep="-"))
    return table


def main() -> None:
    exits_on_user_error(compare)(sys.argv[1:])


if __name__ == "__main__":
    main()
