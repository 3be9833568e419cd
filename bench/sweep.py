"""Sweeps as a user runs them: an 8-job grid and an 8-trial Optuna search, one job at a time and
two at once (joblib), each into its own SQLite MLflow database.

    python bench/sweep.py [--jobs 2] [--epochs 5]

train.py experiment=demo (400 generated images, frozen EfficientNet-Lite0, testing included),
with the feature cache warmed by one run first: the figures are what a head sweep costs after
its one extraction. Every job must leave a FINISHED run with one value per epoch of each metric.
"""

import argparse
import tempfile
from pathlib import Path

import mlflow
from cache_sweep import train  # the same train.py call; bench/ is on the path as the script's

GRID = ["model.optimizer.lr=1e-4,3e-4,1e-3,3e-3", "data.batch_size=16,32"]  # 8 jobs
OPTUNA = ["hparams_search=optuna", "hydra.sweeper.n_trials=8"]


def recorded(work: Path, epochs: int) -> tuple[int, float]:
    """Runs of the sweep, all checked complete, and the best val/acc_best among them."""
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlruns'}/mlflow.db")
    experiment = client.get_experiment_by_name("sem-cls-demo")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep_id != ''")
    runs = [run for run in runs if "sweep_summary_of" not in run.data.tags]
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_id
        for key in ("train/loss", "val/acc", "val/acc_best"):
            history = client.get_metric_history(run.info.run_id, key)
            assert len(history) == epochs, (run.info.run_id, key, len(history))
    return len(runs), max(run.data.metrics["val/acc_best"] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs with joblib")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    epochs = f"trainer.max_epochs={args.epochs}"
    parallel = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        single = train(Path(tmp) / "warm", epochs, cache=cache)
        for name, search in (("grid", GRID), ("optuna", OPTUNA)):
            for launcher, extra in (("1 at a time", []), (f"{args.jobs} at once", parallel)):
                work = Path(tmp) / f"{name}-{len(extra)}"
                wall = train(work, epochs, *search, *extra, multirun=True, cache=cache)
                runs, best = recorded(work, args.epochs)
                rows.append((name, launcher, runs, wall, best))

    print(f"\nexperiment=demo, {args.epochs} epochs, warm feature cache; seconds")
    print(f"one run (train.py without -m, the warming run): {single:.1f}")
    header = ("sweep", "jobs", "runs", "wall", "per run", "best val/acc_best")
    print("{:8} {:12} {:>5} {:>7} {:>8} {:>18}".format(*header))
    for name, launcher, runs, wall, best in rows:
        print(f"{name:8} {launcher:12} {runs:>5} {wall:>7.1f} {wall / runs:>8.1f} {best:>18.4f}")


if __name__ == "__main__":
    main()
