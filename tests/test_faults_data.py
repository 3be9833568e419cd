"""Faults in what a user's data and setup hold: class names in any script, the same image under
two labels, two Optuna searches sharing one study, a tracking server reachable beyond this
machine. Tiny generated data; in-process where a run allows it."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.helpers import (
    ROOT,
    assert_user_error,
    compose_config,
    run_in_process,
    tiny_training_overrides,
)

UNICODE_CLASSES = {"Nanowires": "纳米线", "Particles": "颗粒", "Porous_Sponge": "Poröse"}


def copy_classes(source: Path, target: Path, names: dict[str, str]) -> Path:
    """`target` with the images of `source`'s classes under other folder names."""
    for old, new in names.items():
        shutil.copytree(source / old, target / new)
    return target


def test_class_names_outside_ascii_get_distinct_legal_metric_keys(tiny_sem_dir, tmp_path):
    from sem_cls.data.metric_keys import metric_key
    from train import train

    data_dir = copy_classes(tiny_sem_dir, tmp_path / "sem", UNICODE_CLASSES)
    overrides = [*tiny_training_overrides(data_dir), "trainer.max_epochs=1"]
    cfg = compose_config("train", tmp_path, [*overrides, "logger.mlflow.log_model=false"])
    train(cfg)  # raised MlflowException 'Invalid value "val/recall/"' after the first epoch

    client = mlflow.MlflowClient(cfg.logger.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.mlflow.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    keys = {name: metric_key(name) for name in UNICODE_CLASSES.values()}
    assert len(set(keys.values())) == 3
    assert keys["Poröse"].startswith("Porose-")  # readable where the name has ASCII letters
    for split in ("val", "test"):
        recalls = {k for k in run.data.metrics if k.startswith(f"{split}/recall/")}
        assert recalls == {f"{split}/recall/{key}" for key in keys.values()}
    # the same key in every run: a comparison across runs lines them up
    assert metric_key("纳米线") == keys["纳米线"]
    # which class each key is, with the run
    mapping = client.download_artifacts(run.info.run_id, "data/metric_keys.json", str(tmp_path))
    assert json.loads(Path(mapping).read_text(encoding="utf-8")) == keys


def test_a_class_name_kept_by_mlflow_is_its_own_metric_key():
    from sem_cls.data.metric_keys import metric_key

    for name in ("Films_Coated_Surface", "MEMS devices", "v1.2-b"):
        assert metric_key(name) == name
    # ASCII that Lightning's logger would silently delete: '&' made 'A & B' and 'A  B' one key
    assert metric_key("A & B") != metric_key("A  B")


def conflicting_folder(tiny_sem_dir: Path, root: Path) -> Path:
    """Two classes; one Fibres image copied into Biological, another linked from there."""
    copy_classes(tiny_sem_dir, root, {"Biological": "Biological", "Fibres": "Fibres"})
    fibres = sorted((root / "Fibres").iterdir())
    shutil.copy(fibres[0], root / "Biological" / "copy.png")
    (root / "Biological" / "link.png").symlink_to(fibres[1])
    return root


def report_rows(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return {row["path"]: row["error"] for row in csv.DictReader(f)}


def test_the_same_image_under_two_labels_is_left_out_and_reported(tiny_sem_dir, tmp_path):
    from sem_cls.data.ingest import ingest
    from sem_cls.data.manifest import SplitManifest

    root = conflicting_folder(tiny_sem_dir, tmp_path / "sem")
    fibres = sorted(p.name for p in (root / "Fibres").iterdir())
    conflicting = {"Biological/copy.png", "Biological/link.png"} | {
        f"Fibres/{name}" for name in fibres[:2]
    }
    ingested = ingest(root, workers=1, progress=False)
    manifest = SplitManifest.build(ingested, ratios=(0.5, 0.25, 0.25))
    assert conflicting.isdisjoint(row["path"] for row in manifest.rows)
    assert len(manifest.rows) == 14  # 2 x 8 images, less the two Fibres images with a double
    ingested.write_report(tmp_path / "ingest_report.csv")
    report = report_rows(tmp_path / "ingest_report.csv")
    assert set(report) == conflicting
    assert "label conflict" in report["Biological/link.png"]
    assert f"Fibres/{fibres[1]}" in report["Biological/link.png"]  # names the other file
    assert "left out 4 (4 label conflict)" in ingested.summary()


def test_label_conflicts_can_be_kept_and_are_still_reported(tiny_sem_dir, tmp_path):
    from sem_cls.data.ingest import ingest

    root = conflicting_folder(tiny_sem_dir, tmp_path / "sem")
    ingested = ingest(root, workers=1, progress=False, label_conflicts="keep")
    assert len(ingested.images) == 18
    ingested.write_report(tmp_path / "ingest_report.csv")
    report = report_rows(tmp_path / "ingest_report.csv")
    assert len(report) == 4
    assert all("kept with both labels" in error for error in report.values())


def test_a_manifest_holding_label_conflicts_says_how_to_reuse_it(tiny_sem_dir, tmp_path):
    from sem_cls.data.ingest import ingest
    from sem_cls.data.manifest import SplitManifest
    from sem_cls.errors import UserError

    root = conflicting_folder(tiny_sem_dir, tmp_path / "sem")
    kept = ingest(root, workers=1, progress=False, label_conflicts="keep")
    manifest = SplitManifest.build(kept, ratios=(0.5, 0.25, 0.25)).write(tmp_path / "m.csv")
    with pytest.raises(UserError, match="label conflicts.*data.label_conflicts=keep"):
        SplitManifest.read(manifest, ingest(root, workers=1, progress=False))
    assert len(SplitManifest.read(manifest, kept).rows) == 18


def test_label_conflicts_refused_before_any_work(tiny_sem_dir, tmp_path):
    root = conflicting_folder(tiny_sem_dir, tmp_path / "sem")
    overrides = [*tiny_training_overrides(root), "data.label_conflicts=refuse"]
    result = run_in_process("train.py", *overrides, tmp_path=tmp_path)
    assert_user_error(result, "label conflicts", "Biological/copy.png", "data.label_conflicts=")
    assert not (tmp_path / "cache" / "features").exists()  # no feature was extracted

    overrides[-1] = "data.label_conflicts=ignore"
    result = run_in_process("train.py", *overrides, tmp_path=tmp_path)
    assert_user_error(result, "data.label_conflicts=ignore", "drop, keep, refuse")


def start_search(data_dir: Path, work: Path) -> subprocess.Popen:
    """`train.py hparams_search=optuna` for two trials on the study in `work`'s mlruns."""
    overrides = [o for o in tiny_training_overrides(data_dir) if not o.startswith("data.batch")]
    command = [sys.executable, str(ROOT / "train.py"), *overrides, "hparams_search=optuna"]
    command += ["hydra.sweeper.n_trials=2", "test=false", "logger.mlflow.log_model=false"]
    command += [f"paths.{key}_dir={work / key}" for key in ("mlruns", "log", "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow  # two searches at once, four trials
def test_two_searches_on_one_study_number_jobs_by_trial(tiny_sem_dir, tmp_path):
    import optuna

    searches = [start_search(tiny_sem_dir, tmp_path) for _ in range(2)]
    for search in searches:
        _, stderr = search.communicate(timeout=600)
        assert search.returncode == 0, stderr[-4000:].decode()

    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("sem-cls-demo")
    runs = client.search_runs([experiment.experiment_id], "tags.sweep_id = 'optuna/demo'")
    runs = [run for run in runs if "sweep_summary_of" not in run.data.tags]
    # sweep_job is the trial number: was 0, 1, 1, 2 (each search counted its own jobs)
    assert sorted(int(run.data.tags["sweep_job"]) for run in runs) == [0, 1, 2, 3]
    for run in runs:
        trial = study.trials[int(run.data.tags["sweep_job"])]
        lr = float(run.data.params["model/optimizer/lr"])
        assert lr == pytest.approx(trial.params["model.optimizer.lr"])
        # and the job's folder, in whichever search's folder it is: never another trial's
        assert Path(run.data.params["paths/output_dir"]).name == run.data.tags["sweep_job"]
    folders = [p for p in (tmp_path / "log" / "demo" / "multiruns").glob("*/*") if p.is_dir()]
    assert sorted(p.name for p in folders) == ["0", "1", "2", "3"]


def test_a_server_beyond_loopback_without_credentials_is_refused(tmp_path, monkeypatch, capsys):
    from sem_cls.tracking_server import main, server_command

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit:
        main(["--host", "0.0.0.0", "--port", "5999", "--mlruns", str(tmp_path / "mlruns")])
    assert exit.value.code == 2
    stderr = capsys.readouterr().err
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "mlruns").exists()

    # with them, any address but loopback gets the login; loopback stays as it was
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "lab")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a long secret")
    for host in ("0.0.0.0", "10.1.2.3", "sem-node-7", "::"):
        command, env = server_command(host, 5999, tmp_path / "mlruns")
        assert command[-2:] == ["--app-name", "basic-auth"]
        assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "a long secret"
    for host in ("127.0.0.1", "localhost", "::1"):
        command, env = server_command(host, 5999, tmp_path / "mlruns")
        assert "--app-name" not in command and env == {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a real tracking server
def test_the_tracking_server_with_login_refuses_anonymous_clients(tmp_path, monkeypatch):
    import requests

    url = f"http://127.0.0.1:{free_port()}"
    credentials = {"MLFLOW_TRACKING_USERNAME": "lab", "MLFLOW_TRACKING_PASSWORD": "a long secret"}
    command = [sys.executable, "-m", "sem_cls.tracking_server", "--auth", "--host", "127.0.0.1"]
    command += ["--port", url.rsplit(":", 1)[1], "--mlruns", str(tmp_path / "mlruns")]
    command += ["--workers", "1"]
    server = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **credentials}, start_new_session=True
    )
    try:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        for _ in range(120):
            try:
                anonymous = requests.get(search, timeout=60)
                break
            except requests.ConnectionError:
                assert server.poll() is None, "the server stopped"
                time.sleep(1)
        assert anonymous.status_code == 401  # was 200 with every experiment
        upload = requests.put(
            f"{url}/api/2.0/mlflow-artifacts/artifacts/x.txt", data=b"x", timeout=60
        )
        assert upload.status_code == 401
        wrong = requests.get(search, auth=("lab", "guess"), timeout=60)
        assert wrong.status_code == 401
        assert requests.get(search, auth=("lab", "a long secret"), timeout=60).status_code == 200
        # MLflow's own client (as training nodes use it) reads the same two variables
        for name, value in credentials.items():
            monkeypatch.setenv(name, value)
        client = mlflow.MlflowClient(url)
        experiment_id = client.create_experiment("cluster")
        assert client.get_experiment(experiment_id).name == "cluster"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=30)
