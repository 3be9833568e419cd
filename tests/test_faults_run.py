"""Faults around a whole run: resumed on changed data, out of disk space, signalled, read-only
folders. Each ends with a clear message and exit code, the MLflow run's status says how it
ended, and nothing the run had recorded is overwritten."""

import shutil
from pathlib import Path

import mlflow

from tests.helpers import run_in_process, tiny_training_overrides


def the_run(mlruns_dir: Path):
    """The one training run of the tracking store in `mlruns_dir`."""
    client = mlflow.MlflowClient(f"sqlite:///{mlruns_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def test_a_resumed_run_keeps_its_split_when_the_folder_changed(tiny_sem_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_sem_dir, data)
    run_dir = tmp_path / "run"
    overrides = [
        *[o for o in tiny_training_overrides(data) if not o.startswith("trainer.max_epochs=")],
        "trainer.max_epochs=1",
        "test=false",
    ]
    first = run_in_process("train.py", *overrides, f"hydra.run.dir={run_dir}", tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = (run_dir / "data" / "manifest.csv").read_text()
    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()
    fingerprint = the_run(tmp_path / "mlruns").data.tags["data_split_fingerprint"]

    removed = sorted(data.glob("Fibres/*"))[:2]
    for path in removed:
        path.unlink()
    for index, source in enumerate(sorted(data.glob("Tips/*"))[:3]):
        shutil.copy(source, source.with_name(f"added_{index}{source.suffix}"))

    resumed = run_in_process(
        "train.py", f"resume={run_dir}", "trainer.max_epochs=2", tmp_path=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The run's record of its split and of how it started is as it was.
    assert (run_dir / "data" / "manifest.csv").read_text() == manifest
    assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config
    run = the_run(tmp_path / "mlruns")
    assert run.data.tags["data_split_fingerprint"] == fingerprint
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns'}/mlflow.db")
    epochs = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(epochs) == 2  # the second epoch ran, in the same MLflow run
    # The continuation is in the run's own log and folder, and nowhere else.
    log = (run_dir / "demo.log").read_text()
    for path in removed:
        assert path.relative_to(data).as_posix() in log
    assert "3 images were added" in log and "does not use them" in log
    assert list(run_dir.glob(".hydra/resumed_*/overrides.yaml"))
    assert not (tmp_path / "logs").exists()
