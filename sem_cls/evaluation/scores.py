"""Scores of one evaluated split from its class probabilities: accuracy, F1, bootstrap confidence
intervals, calibration. Numbers only; reports.py writes them to files."""

import numpy as np
import torch
from scipy.stats import bootstrap
from sklearn.metrics import accuracy_score, f1_score, recall_score, top_k_accuracy_score
from torchmetrics.functional.classification import multiclass_calibration_error


def f1_macro(targets: np.ndarray, preds: np.ndarray) -> float:
    """Macro-F1 over the classes present in the targets or the predictions: a class absent from
    both (an external set holding a few classes, or a bootstrap resample) says nothing about
    the model and does not pull the mean down."""
    present = np.union1d(targets, preds)
    return float(f1_score(targets, preds, labels=present, average="macro", zero_division=0))


def resampled_accuracy(targets: np.ndarray, preds: np.ndarray, axis: int = -1) -> np.ndarray:
    """Accuracy of each resample (row)."""
    return (targets == preds).mean(axis=axis)


def resampled_f1_macro(targets: np.ndarray, preds: np.ndarray, axis: int = -1) -> np.ndarray:
    """f1_macro of each resample (row) of (R, n) targets and predictions at once, as
    F1 = 2 TP / (support + predicted); sklearn, one resample at a time, takes a second per 1000."""
    targets, preds = np.atleast_2d(targets), np.atleast_2d(preds)
    rows, classes = len(targets), int(max(targets.max(), preds.max())) + 1
    offset = np.arange(rows)[:, None] * classes  # a class index per (row, class)

    def per_class(index):  # (R, n) indices -> (R, classes) counts
        return np.bincount(index.ravel(), minlength=rows * classes).reshape(rows, classes)

    hits = per_class((offset + targets)[targets == preds])
    seen = per_class(offset + targets) + per_class(offset + preds)  # support + predicted
    present = seen > 0
    return (2 * hits / np.maximum(seen, 1)).sum(axis=1) / present.sum(axis=1)


def bootstrap_ci(
    statistic, targets: np.ndarray, preds: np.ndarray, resamples: int, level: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of a vectorized `statistic(targets, preds, axis)`,
    resampling images."""
    if len(targets) < 2:  # nothing to resample: the interval is the estimate itself
        value = float(statistic(targets[None], preds[None])[0])
        return value, value
    result = bootstrap(
        (targets, preds),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        batch=200,  # (200, n) resampled labels at a time: bounded memory on large splits
        confidence_level=level,
        method="percentile",  # BCa breaks down on degenerate resamples (e.g. accuracy 1.0)
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def calibration_bins(targets: np.ndarray, probs: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Top-label reliability per confidence bin: edges, image count, mean confidence, accuracy
    (NaN for an empty bin). Bins are [lower, upper) as torchmetrics makes them; 1.0 is in the
    top one."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / count
        accuracy = np.bincount(index, correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Top-label ECE: the image-weighted mean gap between confidence and accuracy per bin."""
    return float(
        multiclass_calibration_error(
            torch.as_tensor(probs, dtype=torch.float32),
            torch.as_tensor(targets),
            num_classes=probs.shape[1],
            n_bins=bins,
            norm="l1",
        )
    )


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) class indices and their probabilities, most probable first."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def class_recall(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) recall of each class; 0 for a class with no image in the split."""
    labels = np.arange(num_classes)
    return recall_score(targets, preds, labels=labels, average=None, zero_division=0)


def validation_scores(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """What every validation epoch logs (`val/<name>`): accuracy and macro-F1."""
    preds = probs.argmax(axis=1)
    return {"acc": float(accuracy_score(targets, preds)), "f1_macro": f1_macro(targets, preds)}


def split_scores(
    targets: np.ndarray,
    probs: np.ndarray,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    calibration_bins: int = 15,
) -> dict[str, float]:
    """Point estimates, bootstrap intervals and ECE of one split, by the names they are logged
    under (`<split>/<name>`)."""
    preds = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    acc_low, acc_high = bootstrap_ci(resampled_accuracy, targets, preds, resamples, level, seed)
    f1_low, f1_high = bootstrap_ci(resampled_f1_macro, targets, preds, resamples, level, seed)
    return {
        "acc": float(accuracy_score(targets, preds)),
        "acc_ci_low": acc_low,
        "acc_ci_high": acc_high,
        "acc_top3": float(
            top_k_accuracy_score(targets, probs, k=min(3, len(labels)), labels=labels)
        ),
        "f1_macro": f1_macro(targets, preds),
        "f1_macro_ci_low": f1_low,
        "f1_macro_ci_high": f1_high,
        "f1_weighted": float(
            f1_score(targets, preds, labels=labels, average="weighted", zero_division=0)
        ),
        "ece": expected_calibration_error(targets, probs, calibration_bins),
    }
