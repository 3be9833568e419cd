"""How a trained model is applied: one record shared by predict, the page, the MLflow model and
eval's per-image predictions, so every surface accepts and refuses the same values, and the one
decision those settings govern (prediction_rows: a class, `uncertain` or `unknown`); and what
names a model (a .ckpt file, a model folder, an MLflow model URI)."""

import math
import re
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from sem_cls.errors import UserError

MODEL_URI_SCHEMES = ("models:/", "runs:/")
UNCERTAIN = "uncertain"
UNKNOWN = "unknown"  # unlike the training images (sem_cls.models.novelty)


def is_model_uri(reference) -> bool:
    return str(reference).startswith(MODEL_URI_SCHEMES)


def check_exists(reference, option: str = "ckpt_path") -> None:
    """A reference that names a local file or folder names one that exists (a model URI is
    checked by loading it)."""
    if not is_model_uri(reference) and not Path(reference).exists():
        raise UserError(
            f"{option}={reference} does not exist. Point it at a .ckpt file from training."
        )


class Engine(StrEnum):
    """What runs a frozen backbone (sem_cls.models.engines)."""

    auto = "auto"  # OpenVINO for a frozen backbone on the CPU, torch elsewhere
    torch = "torch"
    openvino = "openvino"


@dataclass
class PredictorSettings:
    """Options of applying a model; None: as the model recorded of its training."""

    top_k: int = 3
    # Below this top-class probability an image is `uncertain`; None: never.
    min_confidence: float | None = None
    # Images unlike the training images are `unknown` (frozen backbones only).
    novelty: bool = True
    engine: Engine | None = None
    info_bar: Any = None  # auto | none | a number of rows; None: as in training
    bf16: bool | None = None
    device: str = "auto"  # auto: cuda when there is one
    batch_size: int = 32
    num_workers: int = 2
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        check_predictor_settings(self)

    @classmethod
    def from_config(cls, cfg) -> "PredictorSettings":
        """Settings from a composed config holding conf/predictor's keys at the top level."""
        return cls(**{field.name: cfg[field.name] for field in fields(cls) if field.name in cfg})

    @classmethod
    def from_params(cls, params: dict | None, **defaults) -> "PredictorSettings":
        """Settings from a request's params (REST, the page): unknown names are refused too."""
        params = {**defaults, **(params or {})}
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise UserError(f"Unknown option(s) {unknown}; known: {sorted(known)}.")
        return cls(**params)


def check_predictor_settings(settings) -> None:
    """Refuse values that are wrong whatever the model (top_k's upper end needs the model)."""
    top_k = settings.top_k
    if isinstance(top_k, bool) or not (isinstance(top_k, int) and top_k >= 1):
        raise UserError(f"top_k={top_k}: give the number of classes to list, 1 or more.")
    threshold = settings.min_confidence
    if threshold is not None and (
        isinstance(threshold, bool)
        or not (isinstance(threshold, int | float) and 0 <= threshold <= 1)
    ):
        raise UserError(
            f"min_confidence={threshold} is not a probability: give a value from 0 to 1 (e.g. "
            "0.6), or null to mark no image uncertain."
        )
    for name in ("batch_size", "max_pixels"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise UserError(f"{name}={value} must be a whole number of 1 or more.")
    workers = settings.num_workers
    if isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 0):
        raise UserError(f"num_workers={workers} must be a whole number of 0 or more.")
    if not isinstance(settings.novelty, bool):
        raise UserError(f"novelty={settings.novelty!r} must be true or false.")
    engine = settings.engine
    if engine is not None and str(getattr(engine, "value", engine)) not in Engine.__members__:
        raise UserError(f"engine={engine!r} is not one of {list(Engine.__members__)}.")
    info_bar = settings.info_bar
    if info_bar not in (None, "auto", "none") and (
        isinstance(info_bar, bool) or not (isinstance(info_bar, int) and info_bar >= 0)
    ):
        raise UserError(
            f"info_bar={info_bar!r}: give auto (find the bar), none (keep the whole image), a "
            "number of bottom rows to cut, or null (as in training)."
        )
    if settings.bf16 is not None and not isinstance(settings.bf16, bool):
        raise UserError(f"bf16={settings.bf16!r} must be true, false or null (as in training).")
    device = settings.device
    if not (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device)):
        raise UserError(f"device={device!r}: give auto (cuda when there is one), cpu or cuda[:N].")


def check_top_k(settings: PredictorSettings, class_count: int) -> None:
    """top_k's upper end: the model's class count."""
    if settings.top_k > class_count:
        raise UserError(
            f"top_k={settings.top_k}, but the model knows {class_count} classes: give 1 to "
            f"{class_count}."
        )


def _number(value) -> float | None:
    """A float, or None where there is none (NaN): rows go to JSON and CSV as they are."""
    return None if value is None or math.isnan(value) else float(value)


def prediction_rows(
    paths: list,
    probabilities,
    novelty,
    errors: list[str],
    *,
    class_names: list[str],
    novelty_threshold: float | None,
    settings: PredictorSettings,
) -> list[dict]:
    """One row per image, the one decision of the project: `unknown` past the novelty threshold
    (when novelty is on and the model has one), `uncertain` below min_confidence, else the most
    probable class; "" and the error for an image that could not be read.

    probabilities: (N, num_classes), NaN rows where unread; novelty: (N,) scores, NaN where not
    scored, or None. Row: path, predicted_class, confidence, novelty (None when not scored),
    top_k [(class, probability)], probabilities {class: probability}, error.
    """
    import numpy as np  # here: settings are checked before any heavy import

    check_top_k(settings, len(class_names))
    scored = settings.novelty and novelty is not None
    threshold = _number(novelty_threshold) if scored else None
    rows = []
    for index, (path, error) in enumerate(zip(paths, errors, strict=True)):
        row = probabilities[index]
        if error or np.isnan(row).any():
            rows.append(
                {"path": str(path), "predicted_class": "", "confidence": None, "novelty": None,
                 "top_k": [], "probabilities": None, "error": error or "no probabilities"}
            )  # fmt: skip
            continue
        score = _number(novelty[index]) if scored else None
        order = np.argsort(-row, kind="stable")[: settings.top_k]
        confidence = float(row[order[0]])
        if threshold is not None and score is not None and score > threshold:
            decision = UNKNOWN
        elif settings.min_confidence is not None and confidence < settings.min_confidence:
            decision = UNCERTAIN
        else:
            decision = class_names[int(order[0])]
        rows.append(
            {
                "path": str(path),
                "predicted_class": decision,
                "confidence": confidence,
                "novelty": score,
                "top_k": [(class_names[int(i)], float(row[i])) for i in order],
                "probabilities": dict(zip(class_names, map(float, row), strict=True)),
                "error": "",
            }
        )
    return rows
