"""Classify new SEM images with a trained model, preprocessed exactly as training preprocessed
them: each file checked as ingest checks it, its info bar cropped, the backbone's eval transform.

python -m sem_cls.predict ckpt_path=logs/train/runs/<time>/checkpoints/epoch_004.ckpt \
    inputs=/data/new_images output=predictions.csv
python -m sem_cls.predict ckpt_path=models:/sem-cls@champion 'inputs=[a.tif,b.png]' \
    top_k=5 min_confidence=0.6

One CSV row per image file (folders are walked recursively): the top-k classes with their
probabilities, `uncertain` below min_confidence, or the reason a file could not be read.
"""

import csv
import logging
import os
from pathlib import Path

import numpy as np
import torch

from sem_cls.data.images import is_image_file, walk_files
from sem_cls.errors import UserError, check_command_line, exits_on_user_error
from sem_cls.evaluation.scores import top_k
from sem_cls.models.engines import create_engine
from sem_cls.models.inference import UNCERTAIN, UNKNOWN, classify_files, decide, unknown_images
from sem_cls.registry import load_model

log = logging.getLogger(__name__)


def image_files(inputs) -> list[Path]:
    """Image files of `inputs`: folders (walked as ingest walks them: recursively, following
    links, by suffix; a symlink loop is listed, to be reported), and files named one by one
    (whatever their suffix: a bad one is reported, not skipped)."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    files = []
    for item in map(Path, items):
        if item.is_dir():
            files += [path for path, error in walk_files(item) if error or is_image_file(path)]
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"inputs: {item} is neither a folder nor a file.")
    if not files:
        raise UserError(f"inputs={items} holds no image files (.jpg .png .tif .bmp).")
    return files


# The first columns of every predictions CSV: how check_output knows one it may replace.
PREDICTIONS_HEADER = "path,predicted_class,confidence"


def write_predictions(
    path: Path,
    files: list[Path],
    probs: np.ndarray,
    errors: list[str],
    class_names: list[str],
    k: int,
    min_confidence: float | None,
    novelty: np.ndarray | None = None,
    unknown: np.ndarray | None = None,
) -> Path:
    """CSV: path, predicted_class, confidence, novelty, top<i>_class and top<i>_prob for i <= k,
    error. `novelty` is empty where not scored (novelty off, or a model without references)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    classes, values = top_k(np.nan_to_num(probs, nan=0.0), k)
    decisions = decide(probs, class_names, min_confidence, unknown)
    novelty = np.full(len(files), np.nan) if novelty is None else novelty
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        header = [*PREDICTIONS_HEADER.split(","), "novelty"]
        for rank in range(1, classes.shape[1] + 1):
            header += [f"top{rank}_class", f"top{rank}_prob"]
        writer.writerow([*header, "error"])
        for file, decision, top, top_probs, score, error in zip(
            files, decisions, classes, values, novelty, errors, strict=True
        ):
            if error:
                writer.writerow([file, "", "", "", *[""] * (2 * len(top)), error])
                continue
            ranked = [item for i, p in zip(top, top_probs, strict=True) for item in
                      (class_names[i], f"{p:.6f}")]  # fmt: skip
            scored = "" if np.isnan(score) else f"{score:.6f}"
            writer.writerow([file, decision, f"{top_probs[0]:.6f}", scored, *ranked, ""])
    return path


def check_output(path: Path) -> None:
    """An existing `path` may be replaced only when it is an earlier predictions CSV."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        with path.open(newline="") as f:
            ours = path.is_file() and f.readline().startswith(PREDICTIONS_HEADER)
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise UserError(
            f"output={path} exists and is not a predictions file of an earlier run; it is left "
            "as it is. Give another output=... path."
        )


def check_config(cfg) -> None:
    """Refuse settings that are wrong whatever the model (top_k's upper end needs the model)."""
    if not (isinstance(cfg.top_k, int) and cfg.top_k >= 1):
        raise UserError(f"top_k={cfg.top_k}: give the number of classes to list, 1 or more.")
    threshold = cfg.min_confidence
    if threshold is not None and not (isinstance(threshold, int | float) and 0 <= threshold <= 1):
        raise UserError(
            f"min_confidence={threshold} is not a probability: give a value from 0 to 1 (e.g. "
            "0.6), or null to mark no image uncertain."
        )
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise UserError(f"batch_size={cfg.batch_size} must be a whole number of 1 or more.")


def predict(cfg) -> Path:
    """Classify every image of `cfg.inputs` with the model of `cfg.ckpt_path`; write cfg.output."""
    check_config(cfg)
    check_output(Path(cfg.output))  # before the work, so a refusal costs nothing
    files = image_files(cfg.inputs)
    model, _, recorded = load_model(cfg.ckpt_path, cfg.get("tracking_uri"))
    if cfg.top_k > len(model.class_names):
        raise UserError(
            f"top_k={cfg.top_k}, but the model knows {len(model.class_names)} classes: give "
            f"1 to {len(model.class_names)}."
        )
    # Unset preprocessing follows what an MLflow model recorded of its training, else defaults.
    info_bar = cfg.info_bar if cfg.info_bar is not None else recorded.get("info_bar", "auto")
    bf16 = cfg.bf16 if cfg.bf16 is not None else recorded.get("bf16", True)
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    engine = cfg.get("engine") or recorded.get("engine", "torch")
    if engine != "torch":
        engine = create_engine(
            engine,
            model.backbone.to(device),
            tuple(model.data_config["input_size"]),
            bf16,
            Path(cfg.paths.cache_dir) / "engines",
        )
    probs, errors, novelty = classify_files(
        model.to(device),
        files,
        info_bar=info_bar,
        max_pixels=cfg.max_pixels,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        bf16=bf16,
        engine=None if engine == "torch" else engine,
    )
    unknown = unknown_images(model, novelty, cfg.get("novelty", True))
    if not cfg.get("novelty", True):
        novelty = None
    output = write_predictions(
        Path(cfg.output),
        files,
        probs,
        errors,
        model.class_names,
        cfg.top_k,
        cfg.min_confidence,
        novelty,
        unknown,
    )
    decisions = decide(probs, model.class_names, cfg.min_confidence, unknown)
    unreadable = sum(bool(error) for error in errors)
    print(
        f"{len(files)} images: {len(files) - unreadable} classified "
        f"({decisions.count(UNKNOWN)} unknown, {decisions.count(UNCERTAIN)} uncertain), "
        f"{unreadable} unreadable\n"
        f"Predictions: {output}"
    )
    for file, error in [(f, e) for f, e in zip(files, errors, strict=True) if e][:20]:
        log.warning("Unreadable %s: %s", file, error)
    return output


def main() -> None:
    # Hydra only for the command line.
    import hydra

    check_command_line(Path(__file__).resolve().parents[1] / "conf", "predict")

    @hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
    @exits_on_user_error
    def run(cfg) -> None:
        predict(cfg)

    run()


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main()
