"""End to end: a short training run is tracked in MLflow, and eval.py reproduces its test score."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config

METRICS = [
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "val/acc_best",
    "val/f1_macro",
    "test/acc",
    "test/acc_top3",
    "test/f1_macro",
]


def artifact_paths(client, run_id, path=""):
    paths = []
    for item in client.list_artifacts(run_id, path):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return paths


def test_run_finishes_with_every_metric_per_epoch(trained_run):
    cfg, metrics, client, run = trained_run
    assert run.info.status == "FINISHED"
    for name in METRICS:
        assert name in run.data.metrics, name
    epochs = cfg.trainer.max_epochs
    for name in ("train/loss", "val/acc", "val/acc_best"):
        assert len(client.get_metric_history(run.info.run_id, name)) == epochs, name
    # train.py returns the metric a sweep optimizes.
    assert metrics[cfg.optimized_metric] == pytest.approx(run.data.metrics["val/acc_best"])
    assert 0 <= run.data.metrics["test/acc"] <= run.data.metrics["test/acc_top3"] <= 1


def test_run_records_config_code_and_split(trained_run):
    cfg, _, client, run = trained_run
    params = run.data.params
    assert params["model/backbone"] == "tf_efficientnet_lite0"
    assert params["model/optimizer/lr"] == str(cfg.model.optimizer.lr)
    assert params["data/data_dir"] == cfg.data.data_dir
    tags = run.data.tags
    assert len(tags["data_split_fingerprint"]) == 64
    assert tags["git_commit"]
    split_csv = client.download_artifacts(run.info.run_id, "data/split.csv")
    with open(split_csv) as f:
        rows = list(csv.DictReader(f))
    assert {row["split"] for row in rows} == {"train", "val", "test"}


def test_run_logs_reports_and_checkpoint(trained_run):
    _, _, client, run = trained_run
    paths = artifact_paths(client, run.info.run_id)
    for split in ("val", "test"):
        for name in ("confusion_matrix.png", "confusion_matrix.csv"):
            assert f"reports/{split}/{name}" in paths
        for name in ("classification_report.json", "classification_report.txt"):
            assert f"reports/{split}/{name}" in paths
    assert any(path.endswith(".ckpt") for path in paths)


def test_test_reports_match_test_metrics(trained_run, tiny_sem_dir):
    _, _, client, run = trained_run
    run_id = run.info.run_id
    with open(client.download_artifacts(run_id, "reports/test/confusion_matrix.csv")) as f:
        rows = list(csv.reader(f))[1:]
    matrix = torch.tensor([[int(v) for v in row[1:]] for row in rows])
    assert len(matrix) == 10
    # Every test image counted once; the diagonal is what test/acc counted as right.
    test_images = int(matrix.sum())
    assert matrix.trace() / test_images == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    with open(client.download_artifacts(run_id, "reports/test/classification_report.json")) as f:
        report = json.load(f)
    assert report["accuracy"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    assert report["macro avg"]["support"] == test_images
    assert report["macro avg"]["f1-score"] == pytest.approx(
        run.data.metrics["test/f1_macro"], abs=1e-4
    )


def test_eval_reproduces_test_accuracy(trained_run, tmp_path):
    from eval import evaluate

    cfg, _, client, run = trained_run
    checkpoints = [p for p in artifact_paths(client, run.info.run_id) if p.endswith(".ckpt")]
    best = next(p for p in checkpoints if "last" not in p)
    ckpt_path = client.download_artifacts(run.info.run_id, best, str(tmp_path))
    eval_cfg = compose_config(
        "eval",
        tmp_path,
        [
            f"ckpt_path={ckpt_path}",
            f"data.data_dir={cfg.data.data_dir}",
            "data.synthetic=null",
            "data.num_workers=0",
            f"paths.mlruns_dir={cfg.paths.mlruns_dir}",
            f"logger.mlflow.experiment_name={cfg.logger.mlflow.experiment_name}",
            "trainer.enable_progress_bar=false",
        ],
    )
    metrics = evaluate(eval_cfg)
    assert metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    assert metrics["test/f1_macro"] == pytest.approx(run.data.metrics["test/f1_macro"], abs=1e-6)

    (eval_run,) = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.evaluated_run_id = '{run.info.run_id}'"
    )
    assert eval_run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert "reports/test/confusion_matrix.csv" in artifact_paths(client, eval_run.info.run_id)


def test_eval_refuses_data_with_other_classes(trained_run, tmp_path):
    from eval import evaluate
    from sem_cls.errors import UserError

    cfg, _, client, run = trained_run
    best = next(
        p
        for p in artifact_paths(client, run.info.run_id)
        if p.endswith(".ckpt") and "last" not in p
    )
    ckpt_path = client.download_artifacts(run.info.run_id, best, str(tmp_path))
    other = tmp_path / "other"
    source = sorted(Path(cfg.data.data_dir).glob("*/*.jpg"))[0]
    for name in ("Fibres", "Nanowires", "Unknown_class"):
        for index in range(8):
            (other / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, other / name / f"{index}.jpg")
    eval_cfg = compose_config(
        "eval", tmp_path, [f"ckpt_path={ckpt_path}", f"data.data_dir={other}", "data.num_workers=0"]
    )
    with pytest.raises(UserError, match="Unknown_class"):
        evaluate(eval_cfg)
