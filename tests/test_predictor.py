"""sem_cls.predictor: one decision for every surface, models loaded without the training stack,
settings refused before torch is imported, and predict's output safe from a second writer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sem_cls.config.predictor import PredictorSettings
from sem_cls.errors import UserError
from sem_cls.predictor import prediction_rows
from tests.helpers import ROOT, assert_user_error, best_checkpoint, run_in_process, run_predict

CLASSES = ["Fibres", "Nanowires", "Powder"]


def decide(probs, scores=None, errors=None, threshold=0.5, **settings) -> list[str]:
    rows = prediction_rows(
        [f"{i}.jpg" for i in range(len(probs))],
        np.array(probs, float),
        None if scores is None else np.array(scores, float),
        errors or [""] * len(probs),
        class_names=CLASSES,
        novelty_threshold=threshold,
        settings=PredictorSettings(**settings),
    )
    return [row["predicted_class"] for row in rows]


def test_the_decision_unknown_then_uncertain_then_the_class():
    probs = [[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8], [np.nan] * 3]
    novelty = [0.1, 0.1, 0.9, np.nan]
    errors = ["", "", "", "truncated"]
    assert decide(probs, novelty, errors, min_confidence=0.5) == [
        "Fibres", "uncertain", "unknown", ""
    ]  # fmt: skip
    assert decide(probs, novelty, errors, min_confidence=0.5, novelty=False) == [
        "Fibres", "uncertain", "Powder", ""
    ]  # fmt: skip
    # A model without a novelty threshold marks nothing unknown.
    assert decide(probs, novelty, errors, threshold=None) == ["Fibres", "Fibres", "Powder", ""]


def test_rows_carry_none_for_missing_numbers_and_refuse_too_large_a_top_k():
    (read, unread) = prediction_rows(
        ["a.jpg", "b.jpg"], np.array([[0.7, 0.2, 0.1], [np.nan] * 3]), np.array([np.nan] * 2),
        ["", "not an image file"], class_names=CLASSES, novelty_threshold=None,
        settings=PredictorSettings(top_k=2),
    )  # fmt: skip
    assert read["top_k"] == [("Fibres", 0.7), ("Nanowires", 0.2)]
    assert read["novelty"] is None and unread["confidence"] is None
    assert json.dumps([read, unread])  # no NaN: plain JSON
    assert "NaN" not in json.dumps([read, unread])
    with pytest.raises(UserError, match="top_k=4, but the model knows 3 classes"):
        decide([[0.7, 0.2, 0.1]], top_k=4)


@pytest.mark.parametrize(
    ("override", "phrase"),
    [("min_confidence=7", "min_confidence=7"), ("top_k=0", "top_k=0"),
     ("info_bar=bottom", "info_bar='bottom'"), ("device=gpu", "device='gpu'")],
)  # fmt: skip
def test_a_bad_setting_is_refused_before_torch_is_imported(tmp_path, override, phrase):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sem_cls.predict", "ckpt_path=model.ckpt",
         f"inputs={tmp_path}", override, f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert phrase in result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "torch" not in imported and "timm" not in imported


def test_loading_and_classifying_leave_lightning_and_torchmetrics_out(trained_run, tiny_sem_dir):
    image = sorted(tiny_sem_dir.glob("*/*.jpg"))[0]
    script = (
        "import json, sys\n"
        "from sem_cls.config.predictor import PredictorSettings\n"
        "from sem_cls.predictor import Predictor\n"
        f"predictor = Predictor.load({str(best_checkpoint(trained_run[0]))!r}, "
        "PredictorSettings(num_workers=0))\n"
        f"(row,) = predictor.predict([{str(image)!r}])\n"
        "print(json.dumps([row['error'], [m for m in ('lightning', 'torchmetrics') "
        "if m in sys.modules]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    error, training_stack = json.loads(result.stdout.strip().splitlines()[-1])
    assert error == "" and training_stack == []


def test_both_checkpoint_layouts_load_the_same_model(trained_run, tmp_path):
    """A checkpoint whose LightningModule holds the SEMModel as `model` (keys model.*, the spec
    in checkpoint["sem_model"]) and one of the earlier layout give the same probabilities."""
    from sem_cls.models.loading import load_checkpoint, read_checkpoint

    earlier = best_checkpoint(trained_run[0])
    model = load_checkpoint(earlier)
    checkpoint = read_checkpoint(earlier)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    state["val_acc_best.max_value"] = torch.tensor(0.5)  # the LightningModule's own: ignored
    holder = {"state_dict": state, "sem_model": dict(model.spec), "epoch": checkpoint["epoch"]}
    torch.save(holder, tmp_path / "holder.ckpt")
    again = load_checkpoint(tmp_path / "holder.ckpt")
    images = torch.randn(2, 3, *model.data_config["input_size"][1:])
    with torch.inference_mode():
        expected = model.probabilities(model(images))
        np.testing.assert_allclose(again.probabilities(again(images)), expected, atol=1e-6)
    assert again.class_names == model.class_names and again.has_novelty


def test_a_file_that_is_no_checkpoint_is_refused_by_name(tmp_path):
    from sem_cls.models.loading import load_model

    other = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match=f"ckpt_path={other} is not a sem-cls checkpoint"):
        load_model(other)
    with pytest.raises(UserError, match=f"ckpt_path={tmp_path} is a folder"):
        load_model(tmp_path)


def test_a_second_run_on_the_same_output_refuses(tmp_path):
    """While one run holds the output, another refuses at once (exit 2, naming the file)
    instead of both reporting success while one result set is lost; the file is untouched."""
    from filelock import FileLock

    inputs = tmp_path / "images"
    inputs.mkdir()
    Image.new("RGB", (64, 48)).save(inputs / "a.jpg")
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    output.write_text("path,predicted_class,confidence,novelty,error\n")
    # The lock a running predict holds on `output` (sem_cls.predict.output_lock).
    with FileLock(output.parent / f".{output.name}.lock"):
        result = run_in_process(
            "sem_cls.predict", f"ckpt_path={tmp_path / 'model.ckpt'}", f"inputs={inputs}",
            f"output={output}", tmp_path=tmp_path,
        )  # fmt: skip
    assert_user_error(result, f"output={output} is being written by another predict run")
    assert output.read_text() == "path,predicted_class,confidence,novelty,error\n"


@pytest.fixture
def folder_with_other_files(tiny_sem_dir, tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.open(sorted(tiny_sem_dir.glob("*/*.jpg"))[0]).save(folder / "a.png")
    frames = [Image.new("L", (64, 48), shade) for shade in (0, 128, 255)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "notes.txt").write_text("a note")
    return folder


def test_files_left_out_of_a_folder_are_counted_with_the_reason(
    trained_run, folder_with_other_files, tmp_path, capsys
):
    rows = run_predict(trained_run, tmp_path, best_checkpoint(trained_run[0]),
                       folder_with_other_files)  # fmt: skip
    assert [Path(row["path"]).name for row in rows] == ["a.png"]
    printed = capsys.readouterr().out
    assert "2 files in the input folders left out, not image files by their suffix" in printed
    assert "1 .gif, 1 .txt" in printed
    # Written whole: no partial file beside it.
    assert not list(tmp_path.glob("*.tmp"))


def test_a_downloaded_mlflow_model_folder_loads_as_its_checkpoint(
    trained_run, tiny_sem_dir, tmp_path
):
    import mlflow

    from sem_cls.compat import mlflow_tracking_uri
    from sem_cls.predictor import Predictor

    cfg, _, _, run = trained_run
    # As in a fresh process: the run's store is the process's (runs:/ finds the logged model
    # through it, whatever tracking_uri says).
    with mlflow_tracking_uri(cfg.logger.mlflow.tracking_uri):
        folder = mlflow.artifacts.download_artifacts(
            f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "model"),
            tracking_uri=cfg.logger.mlflow.tracking_uri,
        )  # fmt: skip
    images = sorted(tiny_sem_dir.glob("*/*.jpg"))[:3]
    settings = PredictorSettings(num_workers=0)
    converted = cfg.paths.engine_dir  # where training converted the backbone
    from_folder = Predictor.load(folder, settings, cache_dir=converted).predict(images)
    from_file = Predictor.load(best_checkpoint(cfg), settings, cache_dir=converted).predict(images)
    assert [r["predicted_class"] for r in from_folder] == [r["predicted_class"] for r in from_file]
    np.testing.assert_allclose(
        [r["confidence"] for r in from_folder], [r["confidence"] for r in from_file], atol=1e-6
    )
    with pytest.raises(UserError, match="not an MLflow model logged by sem-cls"):
        (tmp_path / "other" / "data").mkdir(parents=True)
        (tmp_path / "other" / "MLmodel").write_text("flavors: {}\n")
        Predictor.load(tmp_path / "other", settings)


def test_a_predictor_without_the_conversion_runs_the_one_it_is_handed(
    trained_run, tiny_sem_dir, shared_engine_dir, tmp_path
):
    """A Ray actor on a node whose engine folder lacks the converted backbone runs the driver's
    conversion from memory: the same probabilities, no backbone built, nothing written there."""
    from sem_cls.predictor import Predictor

    ckpt, settings = str(best_checkpoint(trained_run[0])), PredictorSettings(device="cpu")
    Predictor.load(ckpt, settings, cache_dir=shared_engine_dir)  # converted here, if not yet
    driver = Predictor.load(ckpt, settings, cache_dir=shared_engine_dir)
    assert driver.engine_name == "openvino" and driver.model.backbone is None
    elsewhere = tmp_path / "engines"
    converted = driver.engine.converted_files()
    actor = Predictor(
        driver.model, driver.settings, {}, elsewhere, driver.engine.weights, converted
    )
    images = sorted(tiny_sem_dir.rglob("*.jpg"))[:6]
    expected, got = driver.scores(images)[0], actor.scores(images)[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not elsewhere.exists()
    with pytest.raises(ValueError, match="No cached OpenVINO model"):
        Predictor(driver.model, driver.settings, {}, elsewhere, driver.engine.weights)
