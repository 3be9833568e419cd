"""Reliability: killed runs resume to the same result; seeded runs repeat; checkpoints are whole."""

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from tests import helpers
from tests.helpers import PlantedCode, compose_config, tiny_training_overrides

EPOCHS = 3


def metric_histories(mlruns_dir: Path) -> tuple[object, dict[str, list[tuple[int, float]]]]:
    """The one run of the experiment and every metric's (step, value) history."""
    client = mlflow.MlflowClient(f"sqlite:///{mlruns_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    return run, {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }


def start_training(data_dir: Path, work: Path, *overrides: str) -> subprocess.Popen:
    return helpers.start_training(
        data_dir,
        work,
        "data.num_workers=0",  # in-process loading: see docs/reliability.md for loader workers
        # Images through the backbone every epoch: epochs long enough to be killed inside.
        "data.cache_features=false",
        f"trainer.max_epochs={EPOCHS}",
        *overrides,
    )


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


@pytest.mark.slow  # three train.py processes
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_sem_dir, tmp_path):
    # The uninterrupted run beside the one to be killed: they share nothing but the data.
    uninterrupted = start_training(tiny_sem_dir, tmp_path / "whole")
    killed = tmp_path / "killed"
    process = start_training(tiny_sem_dir, killed)
    last = killed / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists():  # the first epoch is done ...
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # ... and the second is under way
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    epochs_before_kill = torch.load(last, weights_only=True)["epoch"]
    assert epochs_before_kill < EPOCHS - 1
    resumed_run = start_training(tiny_sem_dir, killed, f"resume={killed / 'run'}")
    finish(uninterrupted)
    whole_run, whole = metric_histories(tmp_path / "whole" / "mlruns")

    finish(resumed_run)
    run, resumed = metric_histories(killed / "mlruns")
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == str(killed / "run")
    assert set(resumed) == set(whole)
    for key, history in resumed.items():
        steps = [step for step, _ in history]
        # Lightning adds "epoch" to the train and to the validation flush of every epoch.
        if key != "epoch":
            assert len(steps) == len(set(steps)), f"{key} recorded twice at a step: {steps}"
        assert history == whole[key], key
    assert len(resumed["val/acc"]) == EPOCHS
    assert run.data.metrics["test/acc"] == whole_run.data.metrics["test/acc"]


@pytest.mark.parametrize("sampler", ["none", "balanced"])
def test_a_resumed_epoch_sees_the_training_order_of_the_uninterrupted_one(
    sampler, tiny_sem_dir, tmp_path
):
    """With loader workers, an uninterrupted run keeps its workers from epoch to epoch, and a
    resumed one starts them anew; neither may change the order or the global generator."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    from sem_cls.data.datamodule import SEMDataModule
    from sem_cls.data.ingest import ingest_folder
    from sem_cls.data.manifest import SplitManifest

    overrides = [*tiny_training_overrides(tiny_sem_dir), "data.num_workers=2"]
    cfg = compose_config("train", tmp_path, [*overrides, f"data.sampler={sampler}"])

    def train_loader():
        manifest = SplitManifest.from_config(cfg.data, ingest_folder(cfg.data))
        datamodule = SEMDataModule.from_config(manifest, cfg.data, {})
        datamodule.data_config = {
            "input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        }  # fmt: skip
        datamodule.setup("fit")
        return datamodule.loader("train", train=True)

    def epoch(loader, number: int) -> list[int]:
        _set_sampler_epoch(loader, number)  # as Lightning's fit loop does
        return [label for batch in loader for label in batch["label"].tolist()]

    torch.manual_seed(0)
    loader = train_loader()
    orders, saved = [], None
    for number in range(3):
        if number == 2:  # where last.ckpt of epoch 1 saved the generators
            saved = torch.get_rng_state()
        orders.append(epoch(loader, number))
    after_uninterrupted = torch.get_rng_state()
    assert orders[1] != orders[2]

    torch.set_rng_state(saved)  # as RandomState restores it
    assert epoch(train_loader(), 2) == orders[2]
    assert torch.equal(torch.get_rng_state(), after_uninterrupted)


def test_resume_by_mlflow_run_id_and_unknown_references(tiny_sem_dir, tmp_path):
    from sem_cls.errors import UserError
    from sem_cls.resume import saved_config

    cfg = compose_config("train", tmp_path, tiny_training_overrides(tiny_sem_dir))
    with pytest.raises(UserError, match=r"resume=0123abc is neither a run's output folder"):
        saved_config(OmegaConf.merge(cfg, {"resume": "0123abc"}), ["resume=0123abc"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"holds no .hydra/config.yaml"):
        saved_config(OmegaConf.merge(cfg, {"resume": str(empty)}), [f"resume={empty}"])


def test_the_same_config_twice_gives_identical_metrics(trained_run, tiny_sem_dir, tmp_path):
    from train import train

    cfg, _, client, first = trained_run  # the suite's one trained run, this config
    train(compose_config("train", tmp_path, tiny_training_overrides(tiny_sem_dir)))
    _, again = metric_histories(tmp_path / "mlruns")
    before = {
        key: [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, key)]
        for key in first.data.metrics
    }
    assert again == before
    assert len(again["val/acc"]) == 2


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from sem_cls.resume import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}

    def killed_mid_write(io, checkpoint, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpo")
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "lightning.pytorch.plugins.io.TorchCheckpointIO.save_checkpoint", killed_mid_write
    )
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_kill_mid_write_keeps_the_checkpoint_when_temp_files_live_on_another_disk(
    tmp_path, monkeypatch
):
    """Lightning alone writes to a file in TMPDIR and moves it into place; across filesystems
    (TMPDIR on tmpfs or a local disk, runs on a network share) that move copies into the
    existing last.ckpt, so a kill mid-copy leaves it truncated. Ours must not."""
    import errno

    from sem_cls.resume import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)

    def other_filesystem(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src)

    def killed_mid_copy(out_fd, in_fd, offset, count):
        os.write(out_fd, b"half a checkpo")
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", other_filesystem)  # what shutil.move tries first
    monkeypatch.setattr(os, "sendfile", killed_mid_copy)  # what its copy fallback uses
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    from sem_cls.errors import UserError
    from sem_cls.models.loading import load_checkpoint

    marker = tmp_path / "code_ran"
    bad = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {"class_names": ["a"]}, "x": PlantedCode(marker)}, bad)
    with pytest.raises(UserError, match="not a sem-cls checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_reproduce_runs_a_saved_config_as_a_new_run(tiny_sem_dir, tmp_path):
    from sem_cls.resume import saved_config

    original = compose_config("train", tmp_path / "a", tiny_training_overrides(tiny_sem_dir))
    run_dir = tmp_path / "old_run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(original, run_dir / ".hydra" / "config.yaml")
    now = compose_config("train", tmp_path / "b", [f"reproduce={run_dir}"])
    cfg, resume_from = saved_config(now, [f"reproduce={run_dir}", "trainer.max_epochs=3"])
    assert resume_from is None
    assert cfg.paths.output_dir == now.paths.output_dir != original.paths.output_dir
    assert cfg.trainer.max_epochs == 3 and cfg.model == original.model
    assert cfg.data.data_dir == str(tiny_sem_dir)
