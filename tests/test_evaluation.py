"""Evaluation reports: the scores on toy predictions, and every report file of a training run and
of eval.py, checked against scikit-learn and against each other."""

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import classification_report, f1_score

from sem_cls.data.manifest import read_manifest
from sem_cls.evaluation import scores
from tests.helpers import artifact_paths, compose_config

TEST_REPORTS = (
    "confusion_matrix.csv", "confusion_matrix.png", "confusion_matrix_normalized.csv",
    "confusion_matrix_normalized.png", "classification_report.json", "classification_report.txt",
    "metrics.json", "reliability_diagram.png", "mistakes.png", "predictions.csv",
)  # fmt: skip


def toy_probabilities(rng, n: int, classes: int, confidence: np.ndarray, correct: np.ndarray):
    """(targets, probs): the top class has `confidence`, and is the target where `correct`."""
    targets = rng.integers(0, classes, n)
    top = np.where(correct, targets, (targets + rng.integers(1, classes, n)) % classes)
    probs = np.full((n, classes), 0.0)
    probs[:] = ((1 - confidence) / (classes - 1))[:, None]
    probs[np.arange(n), top] = confidence
    return targets, probs


def test_calibration_error_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    n = 20_000
    confidence = rng.uniform(0.3, 1.0, n)
    targets, probs = toy_probabilities(rng, n, 10, confidence, rng.random(n) < confidence)
    assert scores.expected_calibration_error(targets, probs, 15) < 0.02
    # Sure of every answer, right half the time.
    confidence = np.full(n, 0.99)
    targets, probs = toy_probabilities(rng, n, 10, confidence, rng.random(n) < 0.5)
    assert scores.expected_calibration_error(targets, probs, 15) == pytest.approx(0.49, abs=0.02)
    # The reliability diagram's bins are the ones the ECE is computed over.
    bins = scores.calibration_bins(targets, probs, 15)
    filled = bins["count"] > 0
    gap = np.abs(bins["confidence"] - bins["accuracy"])[filled] @ bins["count"][filled] / n
    assert gap == pytest.approx(scores.expected_calibration_error(targets, probs, 15), abs=1e-3)


def test_bootstrap_intervals_bracket_the_estimates_and_are_seeded():
    rng = np.random.default_rng(1)
    n = 300
    targets, probs = toy_probabilities(rng, n, 5, np.full(n, 0.8), rng.random(n) < 0.8)
    preds = probs.argmax(axis=1)
    # The vectorized statistic is scikit-learn's macro-F1 over the classes present.
    assert scores.resampled_f1_macro(targets, preds)[0] == pytest.approx(
        scores.f1_macro(targets, preds)
    )
    assert scores.f1_macro(targets, preds) == pytest.approx(
        f1_score(targets, preds, average="macro")
    )
    result = scores.split_scores(targets, probs, resamples=1000, seed=3)
    for name in ("acc", "f1_macro"):
        low, high = result[f"{name}_ci_low"], result[f"{name}_ci_high"]
        assert low < result[name] < high
        assert 0.05 < high - low < 0.2  # about +-2 standard errors of 300 images
    assert scores.split_scores(targets, probs, resamples=1000, seed=3) == result
    assert result["acc_top3"] >= result["acc"]


def test_training_run_logs_every_test_report(trained_run, tmp_path):
    cfg, _, client, run = trained_run
    run_id = run.info.run_id
    paths = artifact_paths(client, run_id, "reports")
    for name in TEST_REPORTS:
        assert f"reports/test/{name}" in paths, name
    folder = Path(client.download_artifacts(run_id, "reports/test", str(tmp_path)))
    manifest = read_manifest(Path(cfg.paths.output_dir) / "data" / "manifest.csv")
    test_rows = [row for row in manifest if row["split"] == "test"]

    with open(folder / "confusion_matrix.csv") as f:
        header, *rows = list(csv.reader(f))
    class_names = header[1:]
    counts = np.array([[int(v) for v in row[1:]] for row in rows])
    assert counts.sum() == len(test_rows)
    report = json.loads((folder / "classification_report.json").read_text())
    supports = [report[name]["support"] for name in class_names]
    assert counts.sum(axis=1).tolist() == supports
    with open(folder / "confusion_matrix_normalized.csv") as f:
        normalized = np.array([[float(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    assert normalized.sum(axis=1) == pytest.approx(np.ones(len(class_names)), abs=1e-5)
    assert normalized == pytest.approx(counts / counts.sum(axis=1, keepdims=True), abs=1e-6)

    # One row per test image, by path, in the loader's (manifest) order.
    with open(folder / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    data_dir = Path(cfg.data.data_dir)
    assert [row["path"] for row in predictions] == [str(data_dir / r["path"]) for r in test_rows]
    assert [row["true_class"] for row in predictions] == [r["class"] for r in test_rows]
    for row in predictions:
        assert row["predicted_class"] == row["top1_class"]
        top3 = [float(row[f"top{rank}_prob"]) for rank in (1, 2, 3)]
        assert top3 == sorted(top3, reverse=True) and sum(top3) <= 1 + 1e-6
    # The report is scikit-learn's on the same predictions.
    truth = [row["true_class"] for row in predictions]
    predicted = [row["predicted_class"] for row in predictions]
    expected = classification_report(
        truth, predicted, labels=class_names, output_dict=True, zero_division=0
    )
    assert report.keys() == expected.keys()
    for key, value in expected.items():
        assert report[key] == pytest.approx(value), key

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["images"] == len(test_rows)
    assert metrics["acc"] == pytest.approx(report["accuracy"])
    assert metrics["f1_weighted"] == pytest.approx(report["weighted avg"]["f1-score"])
    for name in ("acc", "f1_macro"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
        for bound in ("low", "high"):
            key = f"{name}_ci_{bound}"
            assert run.data.metrics[f"test/{key}"] == pytest.approx(metrics[key], abs=1e-6)
    assert metrics["ece"] == pytest.approx(run.data.metrics["test/ece"], abs=1e-6)
    assert metrics["acc_top3"] == pytest.approx(run.data.metrics["test/acc_top3"], abs=1e-6)
    assert metrics["bootstrap_resamples"] == 1000 and metrics["calibration_bins"] == 15
    # The best validation epoch keeps its lighter report.
    assert "reports/val/confusion_matrix_normalized.csv" in paths


def test_eval_from_the_registered_model_reports_external_images_by_path(trained_run, tmp_path):
    from eval import evaluate

    cfg, _, client, run = trained_run
    lab_c = tmp_path / "lab_c"
    shutil.copytree(Path(cfg.data.data_dir) / "Powder", lab_c / "Powder")
    eval_cfg = compose_config(
        "eval",
        tmp_path,
        [
            "ckpt_path=models:/sem-cls-tiny@champion",
            f"data.data_dir={cfg.data.data_dir}",
            "data.synthetic=null",
            "data.num_workers=0",
            f"paths.mlruns_dir={cfg.paths.mlruns_dir}",
            # The training run's store (where the model is registered), its own experiment.
            "logger.mlflow.experiment_name=sem-cls-eval-of-registered",
            "trainer.enable_progress_bar=false",
            f"external=[{lab_c}]",
        ],
    )
    metrics = evaluate(eval_cfg)
    assert metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    assert metrics["test/acc_ci_low"] == pytest.approx(run.data.metrics["test/acc_ci_low"])
    assert {"external/lab_c/ece", "external/lab_c/acc_ci_high"} <= set(metrics)

    experiment = client.get_experiment_by_name("sem-cls-eval-of-registered")
    (eval_run,) = client.search_runs([experiment.experiment_id])
    assert eval_run.data.tags["ckpt_path"] == "models:/sem-cls-tiny@champion"
    assert eval_run.data.tags["evaluated_run_id"] == run.info.run_id
    paths = artifact_paths(client, eval_run.info.run_id, "reports")
    for split in ("test", "external/lab_c"):
        for name in TEST_REPORTS:
            assert f"reports/{split}/{name}" in paths, (split, name)
    assert "reports/test/saliency.png" in paths  # saliency.images=8 by default
    predictions = client.download_artifacts(
        eval_run.info.run_id, "reports/external/lab_c/predictions.csv", str(tmp_path)
    )
    with open(predictions) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["path"] for row in rows) == sorted(map(str, lab_c.glob("Powder/*.jpg")))
    assert {row["true_class"] for row in rows} == {"Powder"}


def test_saliency_images_are_spread_over_the_classes():
    from sem_cls.evaluation.saliency import spread_over_classes

    assert spread_over_classes([0, 0, 0, 1, 1, 2], 4) == [0, 3, 5, 1]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_validation_report_is_of_the_epoch_whose_checkpoint_is_kept(tmp_path, mode):
    """A val/loss monitor (mode min) keeps the epoch of the lowest loss; the val report is that
    epoch's, as with a maximized monitor."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sem_cls.evaluation.callback import EvaluationReports

    losses = [0.9, 0.3, 0.5, 0.4]  # the best epoch: 1 when minimized, 0 when maximized
    images = 8

    class ScriptedModule(L.LightningModule):
        """Logs the scripted val/scripted; epoch e predicts e + 1 of the images right."""

        class_names = ["a", "b"]

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.model = SimpleNamespace(probabilities=lambda logits: logits.softmax(dim=1))

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0].float()[:, None]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/scripted", losses[self.current_epoch])
            (index,) = batch
            preds = (index > self.current_epoch).long()
            logits = torch.nn.functional.one_hot(preds, 2).float()
            targets = torch.zeros_like(index)
            return {"index": index, "target": targets, "logits": logits, "novelty": index * 0.0}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dataset = torch.utils.data.TensorDataset(torch.arange(images))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    checkpoint = ModelCheckpoint(
        tmp_path / "checkpoints", "epoch_{epoch}", "val/scripted", mode=mode
    )
    reports = EvaluationReports(str(tmp_path / "reports"), monitor="val/scripted")
    trainer = L.Trainer(
        max_epochs=len(losses),
        callbacks=[checkpoint, reports],
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(ScriptedModule(), loader, loader)

    kept_epoch = int(Path(checkpoint.best_model_path).stem.removeprefix("epoch_epoch="))
    assert kept_epoch == (losses.index(min(losses)) if mode == "min" else 0)
    report = json.loads((tmp_path / "reports" / "val" / "classification_report.json").read_text())
    assert report["accuracy"] == (kept_epoch + 1) / images


def test_reports_on_a_monitor_no_checkpoint_keeps_are_refused(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sem_cls.errors import UserError
    from sem_cls.evaluation.callback import EvaluationReports

    trainer = L.Trainer(
        callbacks=[ModelCheckpoint(monitor="val/acc", mode="max")],
        logger=False,
        default_root_dir=tmp_path,
    )
    reports = EvaluationReports(str(tmp_path), monitor="val/loss")
    with pytest.raises(UserError, match="monitor val/loss"):
        reports.setup(trainer, None, "fit")
