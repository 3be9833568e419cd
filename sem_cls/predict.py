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
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sem_cls.data.datamodule import Sample, SEMImageDataset, eval_preprocessing
from sem_cls.data.images import DEFAULT_MAX_PIXELS, is_image_file
from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.ingest import check_image
from sem_cls.errors import UserError
from sem_cls.evaluation.scores import top_k

log = logging.getLogger(__name__)

UNCERTAIN = "uncertain"
UNKNOWN = "unknown"  # unlike the training images (sem_cls.models.novelty)


def image_files(inputs) -> list[Path]:
    """Image files of `inputs`: folders (recursively, by suffix, as ingest picks them), and
    files named one by one (whatever their suffix: a bad one is reported, not skipped)."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    files = []
    for item in map(Path, items):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"inputs: {item} is neither a folder nor a file.")
    if not files:
        raise UserError(f"inputs={items} holds no image files (.jpg .png .tif .bmp).")
    return files


class ImagesToClassify(Dataset):
    """(image tensor, "") per file, or (zeros, why it is unusable): a bad file gets a row in the
    output and the others go on. The check and the crop are ingest's and training's own."""

    def __init__(self, files: list[Path], data_config: dict, info_bar, max_pixels: int):
        self.files = files
        self.crop = InfoBarCrop(info_bar)
        self.transform, self.decode_side = eval_preprocessing(data_config)
        self.max_pixels = max_pixels
        self.shape = tuple(data_config["input_size"])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        record = check_image(path, self.max_pixels)
        if record["error"]:
            return torch.zeros(self.shape), record["error"]
        size = (record["width"], record["height"])
        box = self.crop.box(*size, record["bar_top"])
        sample = Sample(path, -1, box, size, record["sha256"])
        one = SEMImageDataset([sample], self.transform, self.decode_side, self.max_pixels)
        return one[0][0], ""


def classify_files(
    model,
    files: list[Path],
    info_bar="auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 32,
    num_workers: int = 0,
    bf16: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(N, num_classes) temperature-scaled class probabilities of `files`, NaN for a file that
    could not be read, each file's error ("" when read), and (N,) novelty scores (NaN where
    unread, or for a model without novelty references)."""
    dataset = ImagesToClassify(files, model.data_config, info_bar, max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model.eval()
    device = next(model.parameters()).device
    probs, errors, novelty = [], [], []
    bar = tqdm(total=len(files), desc="Classifying", unit="image", disable=not progress)
    with torch.inference_mode(), bar:
        for images, batch_errors in loader:
            images = images.to(device)
            # A frozen backbone runs as the feature cache ran it for training and evaluation
            # (bf16 autocast with data.bf16), so the head sees the features it was fit on.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and model.frozen):
                features, _ = model.backbone_features(images)  # (B, 3, H, W) -> (B, num_features)
            probs.append(model.calibrated(model.head(features.float())).cpu())
            novelty.append(model.novelty(features).cpu())
            errors += batch_errors
            bar.update(len(images))
    probs, novelty = torch.cat(probs).double().numpy(), torch.cat(novelty).double().numpy()
    unread = [bool(error) for error in errors]
    probs[unread], novelty[unread] = np.nan, np.nan
    return probs, errors, novelty


def decide(
    probs: np.ndarray,
    class_names: list[str],
    min_confidence: float | None,
    unknown: np.ndarray | None = None,
) -> list[str]:
    """The class of each image, `unknown` where `unknown` is true (unlike the training images),
    `uncertain` below `min_confidence`, "" where unreadable."""
    decisions = []
    unknown = np.zeros(len(probs), bool) if unknown is None else unknown
    for row, novel in zip(probs, unknown, strict=True):
        if np.isnan(row).any():
            decisions.append("")
        elif novel:
            decisions.append(UNKNOWN)
        elif min_confidence is not None and row.max() < min_confidence:
            decisions.append(UNCERTAIN)
        else:
            decisions.append(class_names[int(row.argmax())])
    return decisions


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
        header = ["path", "predicted_class", "confidence", "novelty"]
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


def unknown_images(model, novelty: np.ndarray, enabled: bool = True) -> np.ndarray:
    """(N,) true for images past the model's novelty threshold; all false when off or when the
    model has no novelty references (said once, so a missing `unknown` is not a surprise)."""
    if not enabled:
        return np.zeros(len(novelty), bool)
    if not model.has_novelty:
        log.warning("This model has no novelty references: no image is marked `unknown`.")
        return np.zeros(len(novelty), bool)
    with np.errstate(invalid="ignore"):  # NaN for unreadable files: not unknown, unread
        return novelty > float(model.novelty_threshold)


def predict(cfg) -> Path:
    """Classify every image of `cfg.inputs` with the model of `cfg.ckpt_path`; write cfg.output."""
    from sem_cls.registry import load_model

    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k}: give the number of classes to list, 1 or more.")
    files = image_files(cfg.inputs)
    model, _, recorded = load_model(cfg.ckpt_path, cfg.get("tracking_uri"))
    # Unset preprocessing follows what an MLflow model recorded of its training, else defaults.
    info_bar = cfg.info_bar if cfg.info_bar is not None else recorded.get("info_bar", "auto")
    bf16 = cfg.bf16 if cfg.bf16 is not None else recorded.get("bf16", True)
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    probs, errors, novelty = classify_files(
        model.to(device),
        files,
        info_bar=info_bar,
        max_pixels=cfg.max_pixels,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        bf16=bf16,
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
    # Hydra only for the command line: the MLflow model imports this module without it.
    import hydra

    from sem_cls.runner import exits_on_user_error

    @hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
    @exits_on_user_error
    def run(cfg) -> None:
        predict(cfg)

    run()


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main()
