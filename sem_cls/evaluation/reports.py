"""Confusion matrix (PNG, CSV) and classification report (JSON, text) for one evaluated split."""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report  # noqa: E402
from sklearn.metrics import confusion_matrix as sk_confusion_matrix  # noqa: E402


def write_reports(
    out_dir: Path, targets: np.ndarray, preds: np.ndarray, class_names: list[str], title: str
) -> list[Path]:
    """Write confusion_matrix.{csv,png} and classification_report.{json,txt}; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(range(len(class_names)))
    matrix = sk_confusion_matrix(targets, preds, labels=labels)  # rows: true, columns: predicted

    matrix_csv = out_dir / "confusion_matrix.csv"
    with matrix_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        writer.writerows(
            [name, *row] for name, row in zip(class_names, matrix.tolist(), strict=True)
        )

    size = max(6, 0.7 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False
    )
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")  # long class names
    ax.set_title(title)
    fig.tight_layout()
    matrix_png = out_dir / "confusion_matrix.png"
    fig.savefig(matrix_png, dpi=100)
    plt.close(fig)

    report_kwargs = dict(labels=labels, target_names=class_names, zero_division=0)
    report_json = out_dir / "classification_report.json"
    report = classification_report(targets, preds, output_dict=True, **report_kwargs)
    report_json.write_text(json.dumps(report, indent=2))
    report_txt = out_dir / "classification_report.txt"
    report_txt.write_text(classification_report(targets, preds, digits=4, **report_kwargs))
    return [matrix_csv, matrix_png, report_json, report_txt]
