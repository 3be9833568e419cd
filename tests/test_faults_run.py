"""Faults around a whole run: resumed on changed data, out of disk space, signalled, read-only
folders. Each ends with a clear message and exit code, the MLflow run's status says how it
ended, and nothing the run had recorded is overwritten."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from lightning import Callback

from tests.helpers import ROOT, run_in_process, tiny_training_overrides


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


def start_training(data_dir: Path, work: Path, *overrides: str) -> subprocess.Popen:
    """train.py as a user starts it, in the background, its output folder `work/run`."""
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *tiny_training_overrides(data_dir),
            f"paths.mlruns_dir={work / 'mlruns'}",
            f"paths.log_dir={work / 'logs'}",
            f"paths.cache_dir={work / 'cache'}",
            f"hydra.run.dir={work / 'run'}",
            *overrides,
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(process: subprocess.Popen, found, what: str) -> None:
    deadline = time.monotonic() + 300
    while not found():
        assert process.poll() is None, f"training ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} within 300 s"
        time.sleep(0.02)


class SignalAtBatch(Callback):
    """Sends this process `signum` after training batch `batch` of epoch `epoch`: a cluster's
    time limit or a Ctrl+C arriving mid-epoch, at a known place."""

    def __init__(self, signum: str, epoch: int = 0, batch: int = 2):
        self.signum, self.epoch, self.batch = signal.Signals[signum], epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(("signum", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_epoch_saves_the_epoch_and_ends_the_run_killed(
    signum, code, tiny_sem_dir, tmp_path
):
    run_dir = tmp_path / "run"
    result = run_in_process(
        "train.py",
        *tiny_training_overrides(tiny_sem_dir),
        "data.batch_size=4",
        f"+callbacks.signal._target_={__name__}.SignalAtBatch",
        f"+callbacks.signal.signum={signum}",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    assert result.returncode == code, result.stderr[-3000:]
    assert f"Stopped by {signum}" in result.stderr and f"resume={run_dir}" in result.stderr
    assert "Traceback" not in result.stderr
    assert the_run(tmp_path / "mlruns").info.status == "KILLED"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert (saved["epoch"], batches) == (0, 3)  # the epoch under way, kept where it stopped
    assert not (run_dir / "reports" / "test").exists()  # nothing ran after the stop


@pytest.mark.slow  # a train.py process, stopped as a scheduler or a terminal stops it
def test_sigint_during_feature_extraction_ends_the_run_killed_and_leaves_no_partial_file(
    tiny_sem_dir, tmp_path
):
    process = start_training(tiny_sem_dir, tmp_path, "data.batch_size=2")
    cache = tmp_path / "cache"
    wait_for(process, lambda: any(cache.rglob("*.partial-*.npy")), "feature extraction")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr[-3000:]
    assert f"resume={tmp_path / 'run'}" in stderr and "Traceback" not in stderr
    assert the_run(tmp_path / "mlruns").info.status == "KILLED"
    assert not list(cache.rglob("*.partial-*")) and not list(cache.rglob("*.npy"))
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
