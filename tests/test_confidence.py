"""Calibrated confidence and an honest `unknown`: the temperature and the novelty references a
training run fits, carried by its checkpoint and MLflow model into evaluation and prediction."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sem_cls.models.calibration import fit_temperature
from sem_cls.models.loading import model_from_checkpoint, read_checkpoint
from sem_cls.models.novelty import fit_threshold, novelty_scores, reference_features
from tests.helpers import best_checkpoint, run_predict, write_images_unlike_sem


def test_temperature_undoes_overconfidence():
    # Labels drawn from softmax(z); logits 3z are three times too sure of themselves.
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 10, generator=generator) * 2
    targets = torch.multinomial(z.softmax(1), 1, generator=generator)[:, 0]
    assert fit_temperature(3 * z, targets) == pytest.approx(3, rel=0.1)
    assert fit_temperature(z, targets) == pytest.approx(1, rel=0.1)


def test_novelty_is_zero_on_references_and_the_threshold_flags_the_asked_share():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(300, 64, generator=generator)
    references = reference_features(train, limit=200)
    assert references.shape == (200, 64) and references.dtype == torch.float16
    kept = train[(novelty_scores(train, references) < 1e-3)]
    assert len(kept) == 200  # the kept ones are their own nearest neighbour
    val = torch.randn(1000, 64, generator=generator)
    scores = novelty_scores(val, references)
    assert (scores > fit_threshold(scores, 0.05)).float().mean() == pytest.approx(0.05, abs=0.002)


def test_checkpoint_carries_temperature_and_novelty_references(trained_run):
    cfg = trained_run[0]
    checkpoint = read_checkpoint(best_checkpoint(cfg))
    model = model_from_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert float(model.temperature) == float(state["model.temperature"]) != 1.0
    assert model.has_novelty
    assert len(model.novelty_references) == len(state["model.novelty_references"]) > 0
    assert float(model.novelty_threshold) == float(state["model.novelty_threshold"])


def test_test_reports_give_ece_before_and_after_and_the_unknown_share(trained_run):
    cfg, metrics, client, run = trained_run
    logged = client.get_run(run.info.run_id).data.metrics
    for name in ("test/ece", "test/ece_uncalibrated", "test/unknown_share"):
        assert name in logged
    reports = Path(cfg.paths.output_dir) / "reports" / "test"
    scores = json.loads((reports / "metrics.json").read_text())
    assert scores["ece"] == pytest.approx(logged["test/ece"], abs=1e-6)
    assert scores["ece_uncalibrated"] == pytest.approx(logged["test/ece_uncalibrated"], abs=1e-6)
    assert scores["ece"] != scores["ece_uncalibrated"]
    with open(reports / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    flagged = np.mean([row["unknown"] == "true" for row in rows])
    assert flagged == pytest.approx(logged["test/unknown_share"])
    # The threshold flags 5% of validation images; a small test split of the same data: few.
    assert flagged <= 0.25


def predict_best(trained_run, tmp_path, inputs, *overrides) -> list[dict]:
    """Predictions CSV rows of the trained run's best checkpoint."""
    return run_predict(trained_run, tmp_path, best_checkpoint(trained_run[0]), inputs, *overrides)


def test_images_unlike_sem_are_unknown_and_test_images_mostly_not(
    trained_run, tiny_sem_dir, tmp_path
):
    unlike = write_images_unlike_sem(tmp_path / "unlike")
    rows = predict_best(trained_run, tmp_path, tmp_path / "unlike")
    assert len(rows) == len(unlike)
    unknown = [row["predicted_class"] == "unknown" for row in rows]
    assert np.mean(unknown) >= 0.75, [(Path(r["path"]).name, r["novelty"]) for r in rows]
    assert all(row["novelty"] and row["top1_class"] != "unknown" for row in rows)

    reported = Path(trained_run[0].paths.output_dir) / "reports" / "test" / "predictions.csv"
    with open(reported) as f:
        test_paths = [row["path"] for row in csv.DictReader(f)]
    rows = predict_best(trained_run, tmp_path, f"[{','.join(test_paths)}]")
    assert np.mean([row["predicted_class"] == "unknown" for row in rows]) <= 0.25

    # novelty=false: no image is unknown, and the column stays empty.
    rows = predict_best(trained_run, tmp_path, tmp_path / "unlike", "novelty=false")
    assert not any(row["predicted_class"] == "unknown" or row["novelty"] for row in rows)


def test_predicted_probabilities_are_temperature_scaled(trained_run, tiny_sem_dir, tmp_path):
    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.predictor import Predictor

    settings = PredictorSettings(num_workers=0, device="cpu")
    predictor = Predictor.load(
        best_checkpoint(trained_run[0]), settings, cache_dir=trained_run[0].paths.engine_dir
    )
    temperature = float(predictor.model.temperature)
    files = sorted(tiny_sem_dir.glob("*/*.jpg"))[:4]
    calibrated, _, _ = predictor.scores(files)
    predictor.model.temperature.fill_(1.0)
    raw, _, _ = predictor.scores(files)
    # softmax(logits / T): log(raw) is the logits up to a constant per image.
    expected = torch.from_numpy(np.log(raw) / temperature).softmax(dim=1).numpy()
    np.testing.assert_allclose(calibrated, expected, atol=1e-5)
    assert not np.allclose(calibrated, raw, atol=1e-4)
