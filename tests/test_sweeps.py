"""Sweeps: grid and Optuna multiruns in MLflow, parallel jobs on one SQLite database, the
end-of-sweep summary and the run comparison. train.py runs as a user runs it, on the tiny set."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.helpers import ROOT, tiny_training_overrides

EXPERIMENT = "sem-cls-demo"  # experiment=demo's


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One cache for every sweep here: the tiny set is extracted once, later trials only read."""
    return tmp_path_factory.mktemp("cache")


def multirun(data_dir: Path, cache_dir: Path, work: Path, *overrides: str, free=()) -> str:
    """stdout of `train.py -m` with every output under `work`; each job trains the head only.
    Keys in `overrides` or `free` are left to the sweep (a value given here would fix them)."""
    swept = {o.split("=", 1)[0] for o in overrides} | set(free)
    fixed = [o for o in tiny_training_overrides(data_dir) if o.split("=", 1)[0] not in swept]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *fixed,
            "test=false",  # sweeps choose by validation; testing each job would only cost time
            "logger.mlflow.log_model=false",
            f"paths.mlruns_dir={work / 'mlruns'}",
            f"paths.log_dir={work / 'logs'}",
            f"paths.cache_dir={cache_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def sweep_runs(work: Path, sweep: str | None = None):
    """The client and the training runs of the demo experiment (of one sweep, if given)."""
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlruns'}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.sweep_id = '{sweep}'" if sweep else ""
    )
    return client, [run for run in runs if "sweep_summary_of" not in run.data.tags]


def histories(client, run) -> dict[str, list[tuple[int, float]]]:
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def read_summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(tiny_sem_dir, feature_cache, tmp_path_factory):
    """A 2 x 2 grid over learning rate and batch size, one job after another."""
    work = tmp_path_factory.mktemp("grid")
    stdout = multirun(
        tiny_sem_dir, feature_cache, work, "model.optimizer.lr=1e-3,3e-4", "data.batch_size=16,32"
    )
    return work, stdout


@pytest.mark.slow  # a 4-job sweep
def test_a_grid_gives_one_finished_run_per_combination_tagged_with_its_sweep(grid):
    work, stdout = grid
    (sweep_dir,) = (work / "logs" / "demo" / "multiruns").iterdir()
    sweep = f"demo/multiruns/{sweep_dir.name}"
    client, runs = sweep_runs(work)
    assert len(runs) == 4
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags["sweep_id"] for run in runs} == {sweep}
    combinations = {
        (run.data.params["model/optimizer/lr"], run.data.params["data/batch_size"]) for run in runs
    }
    assert combinations == {("0.001", "16"), ("0.001", "32"), ("0.0003", "16"), ("0.0003", "32")}
    for run in runs:
        params, overrides = run.data.params, run.data.tags["sweep_overrides"]
        assert f"model.optimizer.lr={params['model/optimizer/lr']}" in overrides
        assert f"data.batch_size={params['data/batch_size']}" in overrides
        assert len(client.get_metric_history(run.info.run_id, "val/acc_best")) == 2  # epochs

    # The summary: every run in the sweep folder's CSV, best first, and on a summary run that
    # the jobs nest under in the MLflow UI.
    rows = read_summary(sweep_dir)
    assert {row["run_id"] for row in rows} == {run.info.run_id for run in runs}
    scores = [float(row["val/acc_best"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert list(rows[0])[:4] == ["job", "val/acc_best", "model.optimizer.lr", "data.batch_size"]
    assert f"Sweep {sweep}: 4 runs; best val/acc_best = {scores[0]:.4f}" in stdout
    assert f"MLflow run {rows[0]['run_id']}" in stdout
    (summary,) = client.search_runs(
        [runs[0].info.experiment_id], filter_string=f"tags.sweep_summary_of = '{sweep}'"
    )
    assert summary.data.tags["sweep_best_run_id"] == rows[0]["run_id"]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} == {summary.info.run_id}
    assert "sweep_summary.csv" in [a.path for a in client.list_artifacts(summary.info.run_id)]


@pytest.mark.slow  # a 4-job sweep
def test_compare_prints_the_top_runs_with_the_params_that_differ(grid, capsys):
    from sem_cls.compare import compare

    work, _ = grid
    table = compare([f"paths.mlruns_dir={work / 'mlruns'}", "experiment=demo", "top=3"])
    printed = capsys.readouterr().out
    assert f"Experiment '{EXPERIMENT}'" in printed and "top 3 of 4 runs by val/acc_best" in printed
    assert list(table.columns) == [
        "val/acc_best", "data.batch_size", "model.optimizer.lr", "status", "run_id", "sweep_id",
    ]  # fmt: skip
    assert list(table["val/acc_best"]) == sorted(table["val/acc_best"], reverse=True)
    for run_id in table["run_id"]:
        assert run_id in printed
    by_loss = compare([f"paths.mlruns_dir={work / 'mlruns'}", "metric=val/loss",
                       "direction=minimize"])  # fmt: skip
    assert list(by_loss["val/loss"]) == sorted(by_loss["val/loss"])


@pytest.mark.slow  # parallel sweep jobs
def test_parallel_jobs_on_one_sqlite_database_record_every_run_and_metric(
    grid, tiny_sem_dir, feature_cache, tmp_path
):
    # A fresh database: two jobs creating its tables at once would break it, unless the sweep
    # has created them, with the experiment, before the jobs start.
    multirun(
        tiny_sem_dir, feature_cache, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "model.optimizer.lr=1e-3,3e-4", "data.batch_size=16",
    )  # fmt: skip
    client, runs = sweep_runs(tmp_path)
    assert len(runs) == 2
    assert {run.info.status for run in runs} == {"FINISHED"}
    # The same jobs one after another (the grid) recorded the same histories, step for step.
    grid_client, grid_runs = sweep_runs(grid[0])
    sequential = {
        run.data.params["model/optimizer/lr"]: run
        for run in grid_runs
        if run.data.params["data/batch_size"] == "16"
    }
    for run in runs:
        parallel = histories(client, run)
        alone = histories(grid_client, sequential[run.data.params["model/optimizer/lr"]])
        assert parallel.keys() == alone.keys()
        for key, steps in alone.items():
            assert [step for step, _ in parallel[key]] == [step for step, _ in steps], key
            # Other thread counts in parallel workers change float sums in the last bits, and the
            # temperature fitted on them (LBFGS) carries that a little further.
            assert [v for _, v in parallel[key]] == pytest.approx([v for _, v in steps], rel=1e-4)


@pytest.mark.slow  # two searches
def test_an_optuna_search_resumes_from_its_storage_and_names_the_best_trial(
    tiny_sem_dir, feature_cache, tmp_path
):
    import optuna

    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    multirun(tiny_sem_dir, feature_cache, tmp_path, *search, free=["data.batch_size"])
    _, runs = sweep_runs(tmp_path, "optuna/demo")
    assert len(runs) == 2
    # The same command asking for 3 trials continues the stored study (as after a kill): one
    # more trial, numbered on, and a summary of all three.
    search[1] = "hydra.sweeper.n_trials=3"
    stdout = multirun(tiny_sem_dir, feature_cache, tmp_path, *search, free=["data.batch_size"])
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.trials[2].params not in (study.trials[0].params, study.trials[1].params)
    _, runs = sweep_runs(tmp_path, "optuna/demo")
    assert sorted(int(run.data.tags["sweep_job"]) for run in runs) == [0, 1, 2]
    assert {run.info.status for run in runs} == {"FINISHED"}

    resumed_dir = max((tmp_path / "logs" / "demo" / "multiruns").iterdir())
    assert [p.name for p in resumed_dir.iterdir() if p.is_dir()] == ["2"]
    rows = read_summary(resumed_dir)
    assert {row["run_id"] for row in rows} == {run.info.run_id for run in runs}
    assert int(rows[0]["job"]) == study.best_trial.number
    assert float(rows[0]["val/acc_best"]) == study.best_value
    assert f"best val/acc_best = {study.best_value:.4f}" in stdout
    for key, value in study.best_params.items():  # the search space, all in the CSV
        assert rows[0][key] == str(value)
        assert f"{key}={value}" in stdout  # and printed
    assert set(study.best_params) == {
        "model.optimizer.lr", "model.optimizer.weight_decay", "data.batch_size",
        "model.label_smoothing", "model.class_weighting",
    }  # fmt: skip
    assert (resumed_dir / "optimization_results.yaml").is_file()


def load_with_workers() -> list[list[int]]:
    """In a joblib worker, after the callback: a DataLoader with worker processes."""
    from torch.utils.data import DataLoader

    from sem_cls.sweeps import PlatformStartMethod

    PlatformStartMethod().on_job_start(config=None)
    return [batch.tolist() for batch in DataLoader(list(range(4)), batch_size=2, num_workers=2)]


def test_data_loader_workers_start_inside_joblib_workers():
    from joblib import Parallel, delayed

    batches = Parallel(n_jobs=2)(delayed(load_with_workers)() for _ in range(2))
    assert batches == [[[0, 1], [2, 3]]] * 2


def test_launcher_and_search_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        slurm = compose(
            "train",
            ["hparams_search=optuna", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
        search = compose(
            "train",
            ["hparams_search=optuna", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
            return_hydra_config=True,
        )
    # Optuna asks for as many trials at once as the launcher runs together.
    assert slurm.hydra.sweeper.n_jobs == slurm.hydra.launcher.array_parallelism
    assert search.hydra.sweeper.n_jobs == 2
