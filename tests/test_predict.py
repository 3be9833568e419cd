"""sem_cls.predict: new images of any format, bad files, uncertain ones, and the same answers from
a checkpoint, the registered MLflow model and evaluation."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sem_cls.config.predictor import PredictorSettings
from sem_cls.errors import UserError
from sem_cls.predict import check_output, predict, write_predictions
from sem_cls.predictor import prediction_rows
from sem_cls.registry import _tracking
from tests.helpers import IMAGE_SUFFIXES, ROOT, best_checkpoint, compose_config, run_predict


@pytest.fixture(scope="module")
def mixed_folder(tiny_sem_dir, tmp_path_factory) -> Path:
    """JPEG, PNG, 16-bit TIFF in a subfolder, a truncated JPEG, and a text file."""
    folder = tmp_path_factory.mktemp("mixed")
    sources = sorted(tiny_sem_dir.glob("*/*.jpg"))
    Image.open(sources[0]).save(folder / "a.jpg")
    Image.open(sources[9]).save(folder / "b.png")
    (folder / "sub").mkdir()
    wide = np.asarray(Image.open(sources[17]).convert("L")).astype(np.uint16) * 180
    Image.fromarray(wide).save(folder / "sub" / "c.tif")
    (folder / "sub" / "broken.jpg").write_bytes(sources[25].read_bytes()[:1500])
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder


def probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[float(row[f"top{k}_prob"] or "nan") for k in range(1, 4)] for row in rows])


def test_every_file_gets_a_row_and_a_bad_one_does_not_stop_the_run(
    trained_run, mixed_folder, tmp_path
):
    checkpoint = best_checkpoint(trained_run[0])
    rows = run_predict(trained_run, tmp_path, checkpoint, mixed_folder, "top_k=10")
    by_name = {Path(row["path"]).name: row for row in rows}
    assert sorted(by_name) == ["a.jpg", "b.png", "broken.jpg", "c.tif"]  # not notes.txt
    broken = by_name.pop("broken.jpg")
    assert "truncated" in broken["error"]
    assert broken["predicted_class"] == broken["confidence"] == broken["top1_class"] == ""
    for row in by_name.values():
        assert row["error"] == ""
        probs = [float(row[f"top{k}_prob"]) for k in range(1, 11)]
        assert sum(probs) == pytest.approx(1, abs=1e-5)  # all ten classes
        assert probs == sorted(probs, reverse=True)
        assert row["predicted_class"] == row["top1_class"]
        assert float(row["confidence"]) == probs[0]

    lowest, second = sorted(float(row["confidence"]) for row in by_name.values())[:2]
    threshold = (lowest + second) / 2  # one image below it
    rows = run_predict(
        trained_run, tmp_path, checkpoint, mixed_folder, f"min_confidence={threshold}"
    )
    for row in rows:
        if row["error"]:
            continue
        uncertain = float(row["confidence"]) < threshold
        assert (row["predicted_class"] == "uncertain") == uncertain
        assert row["top1_class"] != "uncertain"
    assert [row["predicted_class"] for row in rows].count("uncertain") == 1


def test_checkpoint_registered_model_and_evaluation_agree(trained_run, mixed_folder, tmp_path):
    import mlflow

    cfg, _, client, run = trained_run
    from_file = run_predict(trained_run, tmp_path, best_checkpoint(cfg), mixed_folder)
    from_registry = run_predict(
        trained_run, tmp_path, "models:/sem-cls-tiny@champion", mixed_folder
    )
    assert [r["predicted_class"] for r in from_registry] == [
        r["predicted_class"] for r in from_file
    ]
    np.testing.assert_allclose(probabilities(from_registry), probabilities(from_file), atol=1e-6)

    # The MLflow model itself (pyfunc, image bytes in) gives the same answers.
    with _tracking(cfg.logger.mlflow.tracking_uri):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = pd.DataFrame({"image": [Path(row["path"]).read_bytes() for row in from_file]})
    table = model.predict(images)
    assert table["predicted_class"].tolist() == [r["predicted_class"] for r in from_file]
    readable = [not row["error"] for row in from_file]
    confidence = [float(row["confidence"]) for row in from_file if not row["error"]]
    np.testing.assert_allclose(table["confidence"][readable].astype(float), confidence, atol=1e-6)
    assert table["error"].astype(bool).tolist() == [not ok for ok in readable]

    # The test split, predicted image by image, as the training run's test pass saw it.
    reported = client.download_artifacts(
        run.info.run_id, "reports/test/predictions.csv", str(tmp_path)
    )
    with open(reported) as f:
        evaluated = list(csv.DictReader(f))
    paths = ",".join(row["path"] for row in evaluated)
    predicted = run_predict(trained_run, tmp_path, best_checkpoint(cfg), f"[{paths}]")
    # top1: predict says `unknown` for the few test images past the novelty threshold.
    assert [r["top1_class"] for r in predicted] == [r["top1_class"] for r in evaluated]
    np.testing.assert_allclose(probabilities(predicted), probabilities(evaluated), atol=1e-3)


def test_predict_on_real_sem_images(trained_run, real_sem_dir, tmp_path):
    rows = run_predict(trained_run, tmp_path, best_checkpoint(trained_run[0]), real_sem_dir)
    images = [p for p in real_sem_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    assert len(rows) == len(images)
    assert all(row["error"] == "" and row["predicted_class"] for row in rows)


def test_command_line_reports_a_missing_input_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sem_cls.predict", "ckpt_path=model.ckpt",
         f"inputs={tmp_path / 'nowhere'}", f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "nowhere is neither a folder nor a file" in result.stderr


def test_an_unknown_model_uri_is_refused_with_a_message(trained_run):
    from sem_cls.models.loading import load_model

    with pytest.raises(UserError, match="models:/no-such-model@champion could not be loaded"):
        load_model("models:/no-such-model@champion", trained_run[0].logger.mlflow.tracking_uri)


def test_an_existing_file_of_the_users_is_not_overwritten(tmp_path):
    inputs = tmp_path / "images"
    inputs.mkdir()
    Image.new("RGB", (64, 48)).save(inputs / "a.jpg")
    mine = tmp_path / "results.csv"
    mine.write_text("sample,my own notes\n1,keep me\n")
    cfg = compose_config(
        "predict",
        tmp_path,
        [f"ckpt_path={tmp_path / 'none.ckpt'}", f"inputs={inputs}", f"output={mine}"],
    )
    with pytest.raises(UserError, match=f"output={mine}"):
        predict(cfg)  # refused before the checkpoint is even looked at
    assert mine.read_text() == "sample,my own notes\n1,keep me\n"


def test_an_earlier_predictions_file_may_be_replaced(tmp_path):
    rows = prediction_rows(["a.jpg"], np.array([[0.9, 0.1]]), None, [""], class_names=["x", "y"],
                           novelty_threshold=None, settings=PredictorSettings(top_k=1))  # fmt: skip
    earlier = write_predictions(tmp_path / "predictions.csv", rows, 1)
    check_output(earlier)  # no error: the same command may be run again
    check_output(tmp_path / "new.csv")
