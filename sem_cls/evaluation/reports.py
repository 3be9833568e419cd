"""Report files of one evaluated split: confusion matrices, classification report, scores with
confidence intervals, reliability diagram, most confident mistakes, per-image predictions."""

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report  # noqa: E402
from sklearn.metrics import confusion_matrix as sk_confusion_matrix  # noqa: E402

from sem_cls.config.predictor import UNKNOWN, PredictorSettings, prediction_rows
from sem_cls.data.images import open_image, scale_box  # noqa: E402
from sem_cls.data.samples import Sample  # noqa: E402
from sem_cls.evaluation import scores as score_lib  # noqa: E402

THUMBNAIL_SIDE = 192


def write_matrix_csv(path: Path, matrix: np.ndarray, class_names: list[str]) -> Path:
    """Rows: true class, columns: predicted class."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        writer.writerows(
            [name, *row] for name, row in zip(class_names, matrix.tolist(), strict=True)
        )
    return path


# White border around saved figures, in inches: nothing drawn touches the edge of the image.
FIGURE_MARGIN = 0.25


def matrix_figure(matrix: np.ndarray, class_names: list[str], title: str, fmt: str):
    size = max(6, 0.7 * len(class_names))
    # Constrained layout sizes the axes around the long class names and the title.
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False, values_format=fmt
    )
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")  # long class names
    ax.set_title(title)
    return fig


def plot_matrix(path: Path, matrix: np.ndarray, class_names: list[str], title: str, fmt: str):
    fig = matrix_figure(matrix, class_names, title, fmt)
    # The saved image is the drawing's own extent plus a margin, whatever the labels' length.
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=FIGURE_MARGIN)
    plt.close(fig)
    return path


def write_reports(
    out_dir: Path, targets: np.ndarray, preds: np.ndarray, class_names: list[str], title: str
) -> list[Path]:
    """Confusion matrices as counts (confusion_matrix.{csv,png}) and row-normalized, i.e. each
    true class's share per predicted class (confusion_matrix_normalized.{csv,png}), and the
    classification report (classification_report.{json,txt}); return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(range(len(class_names)))
    counts = sk_confusion_matrix(targets, preds, labels=labels)  # rows: true, columns: predicted
    # A class with no image in this split keeps a row of zeros.
    normalized = sk_confusion_matrix(targets, preds, labels=labels, normalize="true")
    paths = [
        write_matrix_csv(out_dir / "confusion_matrix.csv", counts, class_names),
        plot_matrix(out_dir / "confusion_matrix.png", counts, class_names, title, "d"),
        write_matrix_csv(
            out_dir / "confusion_matrix_normalized.csv", normalized.round(6), class_names
        ),
        plot_matrix(
            out_dir / "confusion_matrix_normalized.png",
            normalized,
            class_names,
            f"{title}\nshare of each true class (rows sum to 1)",
            ".2f",
        ),
    ]

    report_kwargs = dict(labels=labels, target_names=class_names, zero_division=0)
    report_json = out_dir / "classification_report.json"
    report = classification_report(targets, preds, output_dict=True, **report_kwargs)
    report_json.write_text(json.dumps(report, indent=2))
    report_txt = out_dir / "classification_report.txt"
    report_txt.write_text(classification_report(targets, preds, digits=4, **report_kwargs))
    return [*paths, report_json, report_txt]


def plot_reliability(path: Path, targets: np.ndarray, probs: np.ndarray, bins: int, title: str):
    """Accuracy per confidence bin beside the bin's mean confidence (equal, on the diagonal,
    when calibrated), over how many images each bin holds."""
    stats = score_lib.calibration_bins(targets, probs, bins)
    edges, count = stats["edges"], stats["count"]
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = count > 0
    top.bar(centres[filled], stats["accuracy"][filled], width, edgecolor="black", label="accuracy")
    top.scatter(
        centres[filled], stats["confidence"][filled], marker="_", s=400, color="tab:red",
        linewidths=2.5, zorder=3, label="mean confidence",
    )  # fmt: skip
    top.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    top.set(ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left")
    bottom.bar(centres, count, width, color="tab:gray", edgecolor="black")
    bottom.set(xlim=(0, 1), xlabel="confidence (top class probability)", ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def thumbnail(sample: Sample) -> np.ndarray:
    """The image as the model saw it: info bar cropped, reduced to a thumbnail."""
    image, size = open_image(sample.path, "RGB", THUMBNAIL_SIDE)
    image = image.crop(scale_box(sample.crop_box, size, image.size))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return np.asarray(image)


def plot_mistakes(
    path: Path,
    targets: np.ndarray,
    probs: np.ndarray,
    samples: list[Sample],
    class_names: list[str],
    limit: int,
    title: str,
) -> Path:
    """The `limit` misclassified images the model was surest of, surest first."""
    preds, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(preds != targets)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    columns = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.8 * columns, 3.1 * rows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown, strict=False):
        ax.imshow(thumbnail(samples[index]))
        ax.set_title(
            f"{samples[index].path.name[:28]}\ntrue: {class_names[targets[index]]}\n"
            f"predicted: {class_names[preds[index]]} ({confidence[index]:.2f})",
            fontsize=8,
        )
    if not len(shown):
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(f"{title}\nmost confident mistakes: {len(shown)} of {len(wrong)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_predictions_csv(
    path: Path,
    targets: np.ndarray,
    probs: np.ndarray,
    image_paths: list[str],
    class_names: list[str],
    k: int = 3,
    novelty: np.ndarray | None = None,
    novelty_threshold: float = float("nan"),
) -> Path:
    """One row per image: path, true and predicted class, confidence, the top k with their
    probabilities; with `novelty`, each image's score and whether it passes the threshold."""
    # The predictor's own decision (sem_cls.config.predictor), so eval and predict agree.
    settings = PredictorSettings(top_k=min(k, len(class_names)), novelty=novelty is not None)
    rows = prediction_rows(
        image_paths, probs, novelty, [""] * len(probs), class_names=class_names,
        novelty_threshold=novelty_threshold, settings=settings,
    )  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        header = ["path", "true_class", "predicted_class", "confidence", "correct"]
        for rank in range(1, settings.top_k + 1):
            header += [f"top{rank}_class", f"top{rank}_prob"]
        if novelty is not None:
            header += ["novelty", "unknown"]
        writer.writerow(header)
        for image, target, row in zip(image_paths, targets, rows, strict=True):
            predicted = row["top_k"][0][0]  # scored as the most probable class
            line = [image, class_names[target], predicted, f"{row['confidence']:.6f}"]
            line.append(str(predicted == class_names[target]).lower())
            for label, prob in row["top_k"]:
                line += [label, f"{prob:.6f}"]
            if novelty is not None:
                unknown = row["predicted_class"] == UNKNOWN
                score = "" if row["novelty"] is None else f"{row['novelty']:.6f}"
                line += [score, str(unknown).lower()]
            writer.writerow(line)
    return path


def write_evaluation(
    out_dir: Path,
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    samples: list[Sample] | None,
    title: str,
    scores: dict[str, float],
    settings: dict,
    novelty: np.ndarray | None = None,
    novelty_threshold: float = float("nan"),
) -> list[Path]:
    """Every report of a test or external split from its (N,) targets and (N, C) probabilities:
    write_reports' files, metrics.json (`scores` and how they were computed),
    reliability_diagram.png, mistakes.png and predictions.csv. `samples` are the images in the
    loader's order; without them predictions.csv has no paths and there is no mistakes.png."""
    preds = probs.argmax(axis=1)
    paths = write_reports(out_dir, targets, preds, class_names, title)

    metrics_json = out_dir / "metrics.json"
    metrics_json.write_text(json.dumps({"images": len(targets), **scores, **settings}, indent=2))
    bins = settings["calibration_bins"]
    reliability = plot_reliability(
        out_dir / "reliability_diagram.png",
        targets,
        probs,
        bins,
        # Three short lines: the figure is narrow, and a long title would be cut at its edges.
        f"{title}\nexpected calibration error {scores['ece']:.3f} ({bins} bins)\n"
        f"{scores.get('ece_uncalibrated', scores['ece']):.3f} before temperature scaling",
    )
    paths += [metrics_json, reliability]
    if samples is not None:
        paths.append(
            plot_mistakes(
                out_dir / "mistakes.png",
                targets,
                probs,
                samples,
                class_names,
                settings["gallery_size"],
                title,
            )
        )
    image_paths = [str(s.path) for s in samples] if samples is not None else [""] * len(targets)
    paths.append(
        write_predictions_csv(
            out_dir / "predictions.csv",
            targets,
            probs,
            image_paths,
            class_names,
            novelty=novelty,
            novelty_threshold=novelty_threshold,
        )
    )
    return paths
