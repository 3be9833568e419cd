"""The files of a data audit (sem_cls.audit): issues.csv, classes.csv, a t-SNE map of the
features, the pixel sizes per class, and audit.html with the top suspects as the model sees them."""

import csv
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sem_cls.data.samples import Sample, SEMImageDataset, eval_preprocessing  # noqa: E402

ISSUE_FIELDS = (
    "path", "given_class", "suggested_class", "label_score", "is_label_issue", "outlier_score",
    "is_outlier", "conflict", "near_duplicates", "pixel_size_nm", "magnification", "voltage_kv",
    "instrument",
)  # fmt: skip
CLASS_FIELDS = (
    "class", "images", "label_issues", "outliers", "conflicts", "with_pixel_size",
    "pixel_size_nm_min", "pixel_size_nm_median", "pixel_size_nm_max",
)  # fmt: skip


def write_report(
    folder: Path,
    issues: list[dict],
    class_names: list[str],
    features: np.ndarray,
    samples: list[Sample],
    data_config: dict,
    top: int = 24,
    seed: int = 42,
) -> Path:
    """Every file of the report into `folder`; `issues`, `features` and `samples` in the same
    order (lowest label_score first)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_issues(folder / "issues.csv", issues)
    classes = class_table(issues, class_names)
    with (folder / "classes.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CLASS_FIELDS)
        writer.writeheader()
        writer.writerows(classes)
    feature_map(folder / "map.png", features, issues, class_names, seed)
    has_scale = pixel_size_plot(folder / "pixel_sizes.png", issues, class_names)
    suspects = {
        "Likely label errors (lowest label_score)": [
            i for i, issue in enumerate(issues) if issue["is_label_issue"]
        ][:top],
        "Outliers (lowest outlier_score)": sorted(
            (i for i, issue in enumerate(issues) if issue["is_outlier"]),
            key=lambda i: issues[i]["outlier_score"],
        )[:top],
        "The same file under two classes": [
            i for i, issue in enumerate(issues) if issue["conflict"]
        ][:top],
        "Near duplicates": [i for i, issue in enumerate(issues) if issue["near_duplicates"]][:top],
    }
    shown = sorted({i for indices in suspects.values() for i in indices})
    write_thumbnails(folder / "thumbnails", {i: samples[i] for i in shown}, data_config)
    write_page(folder / "audit.html", issues, classes, suspects, has_scale)
    return folder


def write_issues(path: Path, issues: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ISSUE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for issue in issues:
            writer.writerow(
                {
                    **issue,
                    "label_score": f"{issue['label_score']:.6f}",
                    "outlier_score": f"{issue['outlier_score']:.6f}",
                }
            )
    return path


def class_table(issues: list[dict], class_names: list[str]) -> list[dict]:
    """Per class: images, flagged ones, and the spread of pixel sizes where metadata has them."""
    table = []
    for name in class_names:
        mine = [issue for issue in issues if issue["given_class"] == name]
        sizes = [issue["pixel_size_nm"] for issue in mine if issue["pixel_size_nm"] != ""]
        row = {
            "class": name,
            "images": len(mine),
            "label_issues": sum(issue["is_label_issue"] for issue in mine),
            "outliers": sum(issue["is_outlier"] for issue in mine),
            "conflicts": sum(bool(issue["conflict"]) for issue in mine),
            "with_pixel_size": len(sizes),
        }
        for key, value in zip(
            ("min", "median", "max"),
            (np.min, np.median, np.max) if sizes else (None, None, None),
            strict=True,
        ):
            row[f"pixel_size_nm_{key}"] = f"{value(sizes):.6g}" if sizes else ""
        table.append(row)
    return table


def feature_map(path: Path, features: np.ndarray, issues, class_names, seed: int) -> Path:
    """t-SNE of the features (PCA to 50 dimensions first, as its authors advise), coloured by
    given class; label issues ringed, outliers as crosses."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    count = len(features)
    reduced = PCA(min(50, count - 1, features.shape[1]), random_state=seed).fit_transform(features)
    perplexity = float(min(30, max(2, (count - 1) // 3)))
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    given = np.array([class_names.index(issue["given_class"]) for issue in issues])
    label_issue = np.array([issue["is_label_issue"] for issue in issues])
    outlier = np.array([issue["is_outlier"] for issue in issues])
    fig, ax = plt.subplots(figsize=(9, 7))
    colours = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for index, name in enumerate(class_names):
        mine = given == index
        ax.scatter(*points[mine].T, s=10, color=colours(index % colours.N), label=name)
    ax.scatter(*points[label_issue].T, s=60, facecolors="none", edgecolors="black",
               linewidths=1, label="likely label error")  # fmt: skip
    ax.scatter(*points[outlier].T, s=50, marker="x", color="red", label="outlier")
    ax.set_title(f"t-SNE of the backbone features, {count} images")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pixel_size_plot(path: Path, issues: list[dict], class_names: list[str]) -> bool:
    """Histograms of pixel size (nm, log scale) per class; none where no image has one."""
    sizes = {
        name: [i["pixel_size_nm"] for i in issues
               if i["given_class"] == name and i["pixel_size_nm"] != ""]
        for name in class_names
    }  # fmt: skip
    sizes = {name: values for name, values in sizes.items() if values}
    if not sizes:
        return False
    everything = [value for values in sizes.values() for value in values]
    low, high = math.log10(min(everything)), math.log10(max(everything))
    bins = np.logspace(low - 0.1, high + 0.1, 30)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(list(sizes.values()), bins=bins, label=list(sizes), stacked=True)
    ax.set_xscale("log")
    ax.set_xlabel("pixel size (nm per pixel)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_thumbnails(folder: Path, samples: dict[int, Sample], data_config: dict) -> None:
    """`<index>.png` of each sample as the model sees it: info bar cut, resized and centre
    cropped by the backbone's own transform."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    transform, decode_side = eval_preprocessing(data_config)
    indices = list(samples)
    dataset = SEMImageDataset([samples[i] for i in indices], transform, decode_side)
    for position, index in enumerate(indices):
        image = dataset[position]["image"]  # (H, W, 3) uint8
        Image.fromarray(image.numpy()).save(folder / f"{index}.png")


def write_page(path: Path, issues, classes, suspects: dict[str, list[int]], has_scale) -> Path:
    """audit.html: counts per class, the map, and each issue type's top suspects."""
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>Data audit</title>",
        "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:180px;"
        "margin:4px;vertical-align:top;font-size:11px}img.t{width:176px}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style>",
        f"<h1>Data audit: {len(issues)} images</h1>",
        "<p>issues.csv lists every image, lowest label_score (most likely mislabeled) first. "
        "Leave flagged images out of a run with <code>data.exclude=issues.csv</code>; no file "
        "is changed.</p><h2>Classes</h2><table><tr>",
        "".join(f"<th>{esc(key)}</th>" for key in CLASS_FIELDS) + "</tr>",
    ]
    for row in classes:
        parts.append("<tr>" + "".join(f"<td>{esc(str(row[k]))}</td>" for k in CLASS_FIELDS))
    parts.append("</table><h2>Map of the features</h2><img src='map.png' width='720'>")
    if has_scale:
        parts.append("<h2>Pixel sizes</h2><img src='pixel_sizes.png' width='640'>")
    for title, indices in suspects.items():
        parts.append(f"<h2>{esc(title)}: {len(indices)} shown</h2>")
        if not indices:
            parts.append("<p>None found.</p>")
        for index in indices:
            issue = issues[index]
            caption = (
                f"{esc(issue['path'])}<br>given {esc(issue['given_class'])}, suggested "
                f"{esc(issue['suggested_class'])}<br>label {issue['label_score']:.3f}, "
                f"outlier {issue['outlier_score']:.3f}"
            )
            if issue["conflict"]:
                caption += f"<br>also: {esc(issue['conflict'])}"
            parts.append(
                f"<figure><img class='t' src='thumbnails/{index}.png'><figcaption>{caption}"
                "</figcaption></figure>"
            )
    path.write_text("\n".join(parts))
    return path
