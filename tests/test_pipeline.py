"""End to end: a short training run is tracked in MLflow, and eval.py reproduces its test score."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from sem_cls.data.manifest import fingerprint, read_manifest
from tests.helpers import artifact_paths, compose_config

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
    # MLflow's own tag names, which its UI shows with the run.
    assert tags["mlflow.source.git.commit"]
    assert tags["mlflow.source.git.dirty"] in {"true", "false", "unknown"}
    manifest = client.download_artifacts(run.info.run_id, "data/manifest.csv")
    rows = read_manifest(Path(manifest))
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    assert fingerprint(rows) == tags["data_split_fingerprint"]
    report = client.download_artifacts(run.info.run_id, "data/ingest_report.csv")
    assert Path(report).read_text().startswith("path,class,error")


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


def test_eval_reproduces_test_accuracy_and_reports_external_folders(trained_run, tmp_path):
    from eval import evaluate

    cfg, _, client, run = trained_run
    lab_b = tmp_path / "lab_b"  # another lab's folder with some of the classes
    for name in ("Fibres", "Tips"):
        shutil.copytree(Path(cfg.data.data_dir) / name, lab_b / name)
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
            f"external=[{lab_b}]",
        ],
    )
    metrics = evaluate(eval_cfg)
    assert 0 <= metrics["external/lab_b/acc"] <= 1
    assert {"external/lab_b/recall/Fibres", "external/lab_b/f1_macro"} <= set(metrics)
    assert metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    assert metrics["test/f1_macro"] == pytest.approx(run.data.metrics["test/f1_macro"], abs=1e-6)

    (eval_run,) = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.evaluated_run_id = '{run.info.run_id}'"
    )
    assert eval_run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    eval_artifacts = artifact_paths(client, eval_run.info.run_id)
    assert "reports/test/confusion_matrix.csv" in eval_artifacts
    matrix = client.download_artifacts(
        eval_run.info.run_id, "reports/external/lab_b/confusion_matrix.csv", str(tmp_path)
    )
    with open(matrix) as f:
        rows = list(csv.reader(f))
    counts = sum(int(value) for row in rows[1:] for value in row[1:])
    assert counts == len(list(lab_b.glob("*/*.jpg")))


def test_eval_refuses_an_external_folder_with_unknown_classes(trained_run, tmp_path):
    from eval import evaluate
    from sem_cls.errors import UserError

    cfg, _, client, run = trained_run
    odd = tmp_path / "odd"
    shutil.copytree(Path(cfg.data.data_dir) / "Tips", odd / "Nanotubes")
    eval_cfg = compose_config(
        "eval",
        tmp_path,
        ["ckpt_path=" + str(next(Path(cfg.paths.output_dir).rglob("*.ckpt"))),
         f"data.data_dir={cfg.data.data_dir}", "data.synthetic=null", "data.num_workers=0",
         f"external=[{odd}]"],
    )  # fmt: skip
    with pytest.raises(UserError, match=r"\['Nanotubes'\].*Known classes: Biological, Fibres"):
        evaluate(eval_cfg)


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
    sources = iter(sorted(Path(cfg.data.data_dir).glob("*/*.jpg")))
    for name in ("Fibres", "Nanowires", "Unknown_class"):
        (other / name).mkdir(parents=True)
        for index in range(8):  # distinct images: duplicates could not be split
            shutil.copy(next(sources), other / name / f"{index}.jpg")
    eval_cfg = compose_config(
        "eval", tmp_path, [f"ckpt_path={ckpt_path}", f"data.data_dir={other}", "data.num_workers=0"]
    )
    with pytest.raises(UserError, match="Unknown_class"):
        evaluate(eval_cfg)
