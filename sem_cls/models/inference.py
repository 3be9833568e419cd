"""Classifying image files with a trained classifier, preprocessed exactly as training
preprocessed them: each file checked as ingest checks it, its info bar cropped, the backbone's
eval transform. Used by `python -m sem_cls.predict` and by the MLflow model (sem_cls.registry)."""

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sem_cls.data.images import DEFAULT_MAX_PIXELS
from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.ingest import check_image
from sem_cls.data.samples import Sample, SEMImageDataset, eval_preprocessing
from sem_cls.data.workers import worker_init_fn
from sem_cls.models.engines import TorchEngine

log = logging.getLogger(__name__)

UNCERTAIN = "uncertain"
UNKNOWN = "unknown"  # unlike the training images (sem_cls.models.novelty)


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
        try:
            return one[0]["image"], ""
        except Exception as err:  # changed since the check, or fails only at this decode size
            return torch.zeros(self.shape), f"{type(err).__name__}: {err}"


def classify_files(
    model,
    files: list[Path],
    info_bar="auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 32,
    num_workers: int = 0,
    bf16: bool = True,
    progress: bool = True,
    engine=None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(N, num_classes) temperature-scaled class probabilities of `files`, NaN for a file that
    could not be read, each file's error ("" when read), and (N,) novelty scores (NaN where
    unread, or for a model without novelty references). `engine` (sem_cls.models.engines) runs a
    frozen backbone; by default torch, bf16 with `bf16` where native."""
    dataset = ImagesToClassify(files, model.data_config, info_bar, max_pixels)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, worker_init_fn=worker_init_fn
    )
    model.eval()
    device = next(model.parameters()).device
    # A frozen backbone runs as the feature cache ran it for training and evaluation (its
    # engine, bf16 with data.bf16), so the head sees the features it was fit on.
    engine = (engine or TorchEngine(model.backbone, bf16)) if model.frozen else None
    probs, errors, novelty = [], [], []
    bar = tqdm(total=len(files), desc="Classifying", unit="image", disable=not progress)
    with torch.inference_mode(), bar:
        for images, batch_errors in loader:
            images = images.to(device)
            # (B, 3, H, W) -> (B, num_features)
            features = engine(images) if engine else model.features(images)
            features = features.to(device).float()
            probs.append(model.probabilities(model.head(features)).cpu())
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
