"""Runs started at the same moment: each gets its own output folder, MLflow run and checkpoints,
on a fresh tracking store as on an existing one; a run killed while it sets up the store or
writes a checkpoint leaves the next run working."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from tests.helpers import ROOT, tiny_training_overrides

# Each process does its slow imports first, says so in a file, then waits for the gate file:
# released together, they reach Hydra's run folder and MLflow's store within milliseconds.
GATED_START = textwrap.dedent(
    """
    import os, runpy, sys, time
    gate, ready, target, *args = sys.argv[1:]
    import hydra, lightning, mlflow, timm, torch
    open(ready, "w").close()
    while not os.path.exists(gate):
        time.sleep(0.002)
    sys.argv = [target, *args]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    """
)


def paths_under(work: Path) -> list[str]:
    return [
        f"paths.mlruns_dir={work / 'mlruns'}",
        f"paths.log_dir={work / 'logs'}",
        f"paths.cache_dir={work / 'cache'}",
    ]


def train_args(data_dir: Path, work: Path) -> list[str]:
    return [
        str(ROOT / "train.py"),
        *tiny_training_overrides(data_dir),
        "trainer.max_epochs=1",
        "logger.mlflow.log_model=false",
        *paths_under(work),
    ]


def start_together(commands: list[list[str]], work: Path) -> list[subprocess.Popen]:
    gate = work / f"gate-{time.monotonic_ns()}"
    readies = [gate.with_name(f"{gate.name}-ready-{i}") for i in range(len(commands))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", GATED_START, str(gate), str(ready), *command],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, ready in zip(commands, readies, strict=True)
    ]
    deadline = time.monotonic() + 300
    while not all(ready.exists() for ready in readies):  # their imports
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline, "the processes did not finish their imports"
        time.sleep(0.05)
    gate.touch()
    return processes


def finish_all(processes: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout; every one must exit 0."""
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def output_folder(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("Output folder: ")]
    return Path(line.removeprefix("Output folder: "))


def assert_separate_runs(stdouts: list[str], work: Path, count: int) -> list[Path]:
    """`count` finished runs in the demo experiment, each with its own folder and checkpoints."""
    folders = [output_folder(stdout) for stdout in stdouts]
    assert len(set(folders)) == len(folders)
    run_ids = [(folder / "mlflow_run_id").read_text() for folder in folders]
    assert len(set(run_ids)) == len(run_ids)
    for folder in folders:
        assert (folder / ".hydra" / "config.yaml").is_file()
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
            "epoch_000.ckpt",
            "last.ckpt",
        ]
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlruns'}/mlflow.db")
    experiment = client.get_experiment_by_name("sem-cls-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == count
    by_id = {run.info.run_id: run for run in runs}
    for folder, run_id in zip(folders, run_ids, strict=True):
        assert by_id[run_id].info.status == "FINISHED"
        assert by_id[run_id].data.params["paths/output_dir"] == str(folder)
    return folders


@pytest.mark.slow
def test_runs_started_together_each_get_a_folder_a_run_and_checkpoints(tiny_sem_dir, tmp_path):
    # A fresh project: no tracking store yet; the two create it together.
    firsts = finish_all(start_together([train_args(tiny_sem_dir, tmp_path)] * 2, tmp_path))
    folders = assert_separate_runs(firsts, tmp_path, 2)

    # Then on the existing store.
    seconds = finish_all(start_together([train_args(tiny_sem_dir, tmp_path)] * 2, tmp_path))
    assert_separate_runs(firsts + seconds, tmp_path, 4)

    # Evaluation and prediction started together, too, each writing its own folder.
    checkpoint = folders[0] / "checkpoints" / "epoch_000.ckpt"
    common = [f"ckpt_path={checkpoint}", *paths_under(tmp_path)]
    evaluate = [
        str(ROOT / "eval.py"),
        *common,
        f"data.data_dir={tiny_sem_dir}",
        "data.synthetic=null",
        "data.num_workers=0",
        "saliency.images=0",
        "trainer.enable_progress_bar=false",
    ]
    predict = ["sem_cls.predict", *common, f"inputs={tiny_sem_dir / 'Fibres'}", "num_workers=0"]
    processes = start_together([evaluate, evaluate, predict, predict], tmp_path)
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    eval_folders = {output_folder(stdout) for stdout, _ in outputs[:2]}
    assert len(eval_folders) == 2
    predictions = sorted((tmp_path / "logs" / "predict" / "runs").glob("*/predictions.csv"))
    assert len(predictions) == 2
    rows = [len(path.read_text().splitlines()) for path in predictions]
    assert rows[0] == rows[1] == 1 + len(list((tiny_sem_dir / "Fibres").iterdir()))


@pytest.mark.slow
def test_a_run_killed_while_creating_the_store_leaves_the_next_run_working(tiny_sem_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, *train_args(tiny_sem_dir, tmp_path)]
    killed = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    database = tmp_path / "mlruns" / "mlflow.db"
    while not database.exists() and killed.poll() is None:
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)  # the store half made, the lock held
    killed.wait()

    after = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert after.returncode == 0, after.stderr[-3000:]
    assert_separate_runs([after.stdout], tmp_path, 1)
