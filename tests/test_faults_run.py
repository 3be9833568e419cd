"""Faults around a whole run: resumed on changed data, out of disk space, signalled, read-only
folders. Each ends with a clear message and exit code, the MLflow run's status says how it
ended, and nothing the run had recorded is overwritten."""

import contextlib
import csv
import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from lightning import Callback

from tests.helpers import (
    assert_user_error,
    cached,
    compose_config,
    run_in_process,
    split_manifest,
    start_training,
    tiny_backbone,
    tiny_training_overrides,
)


def the_run(mlruns_dir: Path):
    """The one training run of the tracking store in `mlruns_dir`."""
    client = mlflow.MlflowClient(f"sqlite:///{mlruns_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.slow  # a run and its continuation
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


@pytest.mark.parametrize(
    ("signum", "code"),
    [("SIGTERM", 143), pytest.param("SIGINT", 130, marks=pytest.mark.slow)],  # the same path
)
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


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` with `options` (size=..., ro): a small or read-only disk,
    for real. Skips the test where mounting is not allowed (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write into `folder` until its disk is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def test_a_full_cache_disk_ends_extraction_with_the_space_needed(tmp_path):
    from sem_cls.data.features import FeatureCache
    from sem_cls.errors import OutOfSpace

    with tmpfs(tmp_path / "cache", "size=256k") as cache:
        fill(cache)
        # Before: np.memmap of a sparse file, and SIGBUS at the first page the disk lacked.
        with pytest.raises(OutOfSpace, match=r"No space left for .*MB free.*paths.cache_dir"):
            cached(FeatureCache(cache), tiny_backbone())
        assert [p.name for p in cache.rglob("*") if p.is_file()] == ["filler"]


def test_extraction_reserves_its_file_before_extracting(tmp_path, monkeypatch):
    """Where a disk fills up while the file is allocated: the message names the entry and its
    size, and no partial file stays."""
    from sem_cls.data.features import FeatureCache
    from sem_cls.errors import OutOfSpace

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutOfSpace, match=r"\.npy: it needs about 0\.0 MB .*paths.cache_dir"):
        cached(FeatureCache(tmp_path / "cache"), tiny_backbone())
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def full_disk_under(folder: Path):
    """os.sendfile (how shutil copies a file on Linux) failing as on a full disk for every
    target under `folder`."""
    sendfile = os.sendfile

    def sendfile_or_full(out_fd, in_fd, offset, count):
        if Path(os.readlink(f"/proc/self/fd/{out_fd}")).is_relative_to(folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return sendfile(out_fd, in_fd, offset, count)

    return sendfile_or_full


def test_a_full_mlflow_store_ends_the_run_failed_with_one_message(
    tiny_sem_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(os, "sendfile", full_disk_under(tmp_path / "mlruns"))
    result = run_in_process(
        "train.py", *tiny_training_overrides(tiny_sem_dir), "trainer.max_epochs=1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert_user_error(result, f"No space left for {tmp_path / 'mlruns'}", "paths.mlruns_dir")
    assert the_run(tmp_path / "mlruns").info.status == "FAILED"


def test_a_full_log_disk_ends_the_run_failed_naming_the_checkpoint(
    tiny_sem_dir, tmp_path, monkeypatch
):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    def full(self, checkpoint, path, storage_options=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full)
    run_dir = tmp_path / "run"
    result = run_in_process(
        "train.py", *tiny_training_overrides(tiny_sem_dir), "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}", tmp_path=tmp_path,
    )  # fmt: skip
    assert_user_error(result, f"No space left for {run_dir / 'checkpoints'}", "paths.log_dir")
    assert the_run(tmp_path / "mlruns").info.status == "FAILED"
    assert not list((run_dir / "checkpoints").iterdir())  # no partial checkpoint left


def test_a_read_only_cache_is_read_and_the_run_goes_on_without_writing(
    tiny_sem_dir, tmp_path, caplog
):
    from sem_cls.data.features import FeatureCache
    from sem_cls.data.ingest import ingest

    with tmpfs(tmp_path / "shared-cache", "ro,size=64k") as cache:
        ingested = ingest(tiny_sem_dir, cache_dir=cache / "ingest", workers=1, progress=False)
        features = cached(FeatureCache(cache / "features"), tiny_backbone())
        assert len(ingested.images) == 80 and features.shape[0] == 6
        assert not list(cache.iterdir())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Ingest cache" in w and "paths.cache_dir" in w for w in warnings), warnings
    assert any("Feature cache" in w and "paths.cache_dir" in w for w in warnings), warnings


def test_the_demo_generator_refuses_a_read_only_target_naming_data_data_dir(tmp_path):
    from sem_cls.data.synthetic import generate_dataset
    from sem_cls.errors import UserError

    refused = pytest.raises(UserError, match=r"cannot be written to .*ro/synthetic.*data.data_dir")
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder, refused:
        generate_dataset(folder / "synthetic", images_per_class=1, workers=1)


@pytest.mark.slow  # a stopped run and its continuation
def test_a_slurm_job_is_requeued_on_its_time_limit_signal_and_resumes(
    tiny_sem_dir, tmp_path, monkeypatch
):
    """As `#SBATCH --signal=SIGUSR1@90` and Lightning's SLURM auto-requeue do it: SIGUSR1 ahead of
    the time limit, Lightning saves and calls `scontrol requeue <job>`, SLURM then sends SIGTERM
    to the job; the requeued job runs the same script, which resumes the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    scontrol = bin_dir / "scontrol"  # SLURM's: requeue ends the running job with SIGTERM
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {requeued}\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}  # fmt: skip
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_training_overrides(tiny_sem_dir),
        "data.batch_size=4",
        f"hydra.run.dir={run_dir}",
    ]
    stopped = run_in_process(
        "train.py",
        *overrides,
        f"+callbacks.signal._target_={__name__}.SignalAtBatch",
        "+callbacks.signal.signum=SIGUSR1",
        tmp_path=tmp_path,
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert requeued.read_text().split() == ["requeue", "4242"]
    assert f"resume={run_dir}" in stopped.stderr
    assert the_run(tmp_path / "mlruns").info.status == "KILLED"

    resumed = run_in_process("train.py", f"resume={run_dir}", tmp_path=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = the_run(tmp_path / "mlruns")
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics


def test_a_resume_that_would_leave_a_class_out_of_a_split_is_refused(tiny_sem_dir, tmp_path):
    from sem_cls.data.ingest import ingest
    from sem_cls.data.manifest import SplitManifest
    from sem_cls.errors import UserError

    data = tmp_path / "data"
    shutil.copytree(tiny_sem_dir, data)
    manifest = split_manifest(data).write(tmp_path / "manifest.csv")
    with manifest.open() as f:
        held_out = [
            r["path"] for r in csv.DictReader(f) if (r["class"], r["split"]) == ("Tips", "val")
        ]
    for path in held_out:
        (data / path).unlink()
    ingested = ingest(data, workers=1, progress=False)
    with pytest.raises(UserError, match=r"no images of class 'Tips' left in val.*without resume="):
        SplitManifest.resumed(manifest, ingested)


def test_a_full_sqlite_store_is_named_with_the_option_that_moves_it(tmp_path):
    """SQLite says "database or disk is full" through SQLAlchemy and MLflow, not as an OSError."""
    import sqlite3

    from mlflow.exceptions import MlflowException

    from sem_cls.stopping import out_of_space

    cfg = compose_config("train", tmp_path)
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as err:
            raise MlflowException("(sqlite3.OperationalError) database or disk is full") from err
    except MlflowException as err:
        full = out_of_space(err, cfg)
    assert full is not None
    assert f"No space left for {tmp_path / 'mlruns'}" in str(full)
    assert "paths.mlruns_dir" in str(full)
    assert out_of_space(RuntimeError("a bug"), cfg) is None
