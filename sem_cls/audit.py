"""Audit a data folder before trusting it: likely label errors, one image under two classes,
outliers and near duplicates, a map of the classes, and each image's physical scale.

python -m sem_cls.audit data.data_dir=/my/sem              # conf/audit.yaml
python -m sem_cls.audit experiment=demo                    # the demo's data and backbone

A frozen backbone's features (from the feature cache) -> out-of-fold class probabilities of a
logistic regression, k-fold over duplicate groups -> cleanlab's label issues and self-confidence
ranking; one k-nearest-neighbour graph of the features for outliers and near duplicates (as
cleanlab's Datalab scores them, without its `datasets` dependency); equal files under two classes
from ingest. The report is a folder (issues.csv, classes.csv, audit.html, map.png, thumbnails)
and an MLflow run. Nothing in the data folder is changed: `data.exclude=<issues.csv>` leaves the
flagged images out of a later run's split.
"""

import json
import logging
import os
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sem_cls.errors import UserError, exits_on_user_error, run_command

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

log = logging.getLogger(__name__)

# Datalab's near-duplicate rule: nearer than this share of the median nearest-neighbour distance.
NEAR_DUPLICATE_SHARE = 0.13


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> np.ndarray:
    """(N, C) class probabilities of each image by a logistic regression that never saw it, nor
    any image of its duplicate group: k folds over groups, stratified by class. A linear head on
    standardized features, as the project's own frozen-backbone classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=100))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(
        head, features, labels, groups=groups, cv=cv, method="predict_proba"
    )  # (N, num_features) -> (N, C)


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab: (label quality score, lower is more likely mislabeled; is a label issue)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return scores, find_label_issues(labels, probabilities)


def neighbour_graph(features: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (N, k) to each image's k nearest other images and their indices, built
    once for outliers and near duplicates."""
    from sklearn.neighbors import NearestNeighbors

    k = min(neighbours, len(features) - 1)
    graph = NearestNeighbors(n_neighbors=k, metric="cosine").fit(features)
    return graph.kneighbors()  # without X: each image's neighbours exclude itself


def outlier_scores(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's OutOfDistribution score from the k-NN graph, exp(-mean distance / its median):
    lower is more unusual; an outlier lies beyond the upper Tukey fence of the mean distances
    (third quartile + 3 interquartile ranges: far out, not merely in the tail)."""
    mean_distance = distances.mean(axis=1)
    scale = max(float(np.median(mean_distance)), 100 * np.finfo(np.float64).eps)
    q1, q3 = np.percentile(mean_distance, [25, 75])
    return np.exp(-mean_distance / scale), mean_distance > q3 + 3 * (q3 - q1)


def near_duplicates(distances: np.ndarray, indices: np.ndarray) -> list[list[int]]:
    """For each image, its neighbours nearer than NEAR_DUPLICATE_SHARE of the median
    nearest-neighbour distance (Datalab's rule)."""
    limit = NEAR_DUPLICATE_SHARE * float(np.median(distances[:, 0]))
    return [idx[dist < limit].tolist() for dist, idx in zip(distances, indices, strict=True)]


def audit_features(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    folds: int = 5,
    neighbours: int = 10,
    seed: int = 42,
) -> dict[str, np.ndarray | list]:
    """Every finding that comes from the features, one entry per image: probabilities,
    label_score, is_label_issue, outlier_score, is_outlier, near_duplicates (indices)."""
    features = np.asarray(features, dtype=np.float32)
    probabilities = out_of_fold_probabilities(features, labels, groups, folds, seed)
    label_score, is_label_issue = label_issues(labels, probabilities)
    distances, indices = neighbour_graph(features, neighbours)
    outlier_score, is_outlier = outlier_scores(distances)
    return {
        "probabilities": probabilities,
        "label_score": label_score,
        "is_label_issue": is_label_issue,
        "outlier_score": outlier_score,
        "is_outlier": is_outlier,
        "near_duplicates": near_duplicates(distances, indices),
    }


def check_classes(labels: np.ndarray, class_names: list[str], folds: int, root) -> int:
    """The number of folds the smallest class allows (at most `folds`), or why the folder
    cannot be audited."""
    if len(class_names) < 2:
        raise UserError(
            f"data.data_dir={root} holds usable images of {len(class_names)} class "
            f"({', '.join(class_names) or 'none'}); an audit compares classes and needs two or "
            "more class folders, <Class>/*.jpg."
        )
    counts = np.bincount(labels, minlength=len(class_names))
    if counts.min() < 2:
        small = [name for name, count in zip(class_names, counts, strict=True) if count < 2]
        raise UserError(
            f"Classes {small} of {root} have a single image: out-of-fold probabilities need two "
            "or more images per class. Add images or remove those folders."
        )
    return int(min(folds, counts.min()))


def load_features(path: str, num_features: int, count: int, backbone: str) -> np.ndarray:
    """A feature matrix given as `audit.features` (an earlier audit's feature cache entry, rows
    in the audit's order), refused when another backbone or another folder made it."""
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(
            f"audit.features={path} is not a readable feature matrix (.npy): {err}. Drop "
            "audit.features to extract the features."
        ) from None
    if features.ndim != 2 or features.shape[1] != num_features:
        raise UserError(
            f"audit.features={path} holds features of width {features.shape[1:]}, but "
            f"model.backbone={backbone} gives {num_features}: it was made by another backbone. "
            "Give the features of this backbone, or drop audit.features."
        )
    if features.shape[0] != count:
        raise UserError(
            f"audit.features={path} has {features.shape[0]} rows for {count} images: it was "
            "made of another folder or another version of it. Drop audit.features."
        )
    return features


def extract(cfg: DictConfig, model, samples) -> np.ndarray:
    """The frozen backbone's features of `samples`, from the feature cache (or into it)."""
    from sem_cls.data.features import extract_features
    from sem_cls.data.ingest import INGEST_VERSION
    from sem_cls.data.samples import SEMImageDataset, eval_preprocessing
    from sem_cls.models.engines import FeatureExtractor, create_engine

    data = cfg.data
    transform, decode_side = eval_preprocessing(model.data_config)
    dataset = SEMImageDataset(samples, transform, decode_side, data.max_pixels)
    extractor = FeatureExtractor.from_config(data, model)
    if extractor is None:
        engine = create_engine(
            data.engine, model.backbone, model.data_config, data.bf16, data.get("engine_dir")
        )
        out = np.empty((len(samples), engine.num_features), dtype=np.float32)
        extract_features(engine, dataset, data.batch_size, data.num_workers, out)
        return out
    # The datamodule's preprocessing key, so an entry is shared wherever the images are the same.
    preprocessing = {
        "ingest": INGEST_VERSION,
        "decode_side": decode_side,
        "transform": repr(transform),
    }
    digests = [f"{s.sha256}:{s.crop_box}" for s in samples]
    return extractor.features(preprocessing, dataset, digests, data.batch_size, data.num_workers)


def audit(cfg: DictConfig) -> Path:
    """Audit `cfg.data.data_dir` with the frozen backbone of `cfg.model`; the report's folder."""
    from sem_cls.data.conflicts import label_conflicts
    from sem_cls.data.ingest import ingest_folder
    from sem_cls.data.manifest import crop_rows, sample_of
    from sem_cls.data.scale import read_scale
    from sem_cls.data.splits import duplicate_groups
    from sem_cls.evaluation.audit_report import write_report
    from sem_cls.models.model import build_model

    started = time.perf_counter()
    settings = cfg.audit
    # Conflicts are kept here: the audit reports them, and scores every image.
    ingested = ingest_folder(OmegaConf.merge(cfg.data, {"label_conflicts": "keep"}))
    class_names = ingested.class_names
    # In content order: moving a file to another class folder reuses the cached features.
    rows = sorted(
        crop_rows(ingested.images, cfg.data.info_bar),
        key=lambda row: (row["sha256"], *(row[k] for k in ("crop_left", "crop_top"))),
    )
    label_of = {name: index for index, name in enumerate(class_names)}
    labels = np.array([label_of[row["class"]] for row in rows])
    folds = check_classes(labels, class_names, settings.folds, ingested.root)
    phash = {record["path"]: record["phash"] for record in ingested.images}
    groups = duplicate_groups(
        [row["sha256"] for row in rows], [phash[row["path"]] for row in rows],
        cfg.data.near_duplicate_bits,
    )  # fmt: skip

    model, _ = build_model(
        class_names,
        backbone=cfg.model.backbone,
        pretrained=cfg.model.pretrained,
        weights_file=cfg.model.get("weights_file"),
        freeze="all",
        info_bar=cfg.data.info_bar,
    )
    samples = [sample_of(row, label_of[row["class"]], ingested.root) for row in rows]
    if settings.get("features"):
        num_features = model.backbone.num_features
        features = load_features(settings.features, num_features, len(rows), cfg.model.backbone)
    else:
        features = extract(cfg, model, samples)
    findings = audit_features(features, labels, groups, folds, settings.neighbours, cfg.data.seed)

    conflicts = {}
    for records in label_conflicts(ingested.images).values():
        for record in records:
            conflicts[record["path"]] = [
                r["path"] for r in records if r["class"] != record["class"]
            ]
    issues = []
    for index, row in enumerate(rows):
        issues.append(
            {
                "path": row["path"],
                "given_class": row["class"],
                "suggested_class": class_names[int(findings["probabilities"][index].argmax())],
                "label_score": float(findings["label_score"][index]),
                "is_label_issue": bool(findings["is_label_issue"][index]),
                "outlier_score": float(findings["outlier_score"][index]),
                "is_outlier": bool(findings["is_outlier"][index]),
                "conflict": " ".join(conflicts.get(row["path"], [])),
                "near_duplicates": " ".join(
                    rows[other]["path"] for other in findings["near_duplicates"][index]
                ),
                **read_scale(ingested.root / row["path"]),
            }
        )
    order = np.argsort([issue["label_score"] for issue in issues], kind="stable")
    issues = [issues[i] for i in order]

    folder = Path(cfg.paths.output_dir) / "audit"
    write_report(
        folder, issues, class_names, features[order], samples=[samples[i] for i in order],
        data_config=model.data_config, top=settings.top, seed=cfg.data.seed,
    )  # fmt: skip
    summary = {
        "data_dir": str(ingested.root),
        "backbone": cfg.model.backbone,
        "images": len(issues),
        "classes": len(class_names),
        "folds": folds,
        "neighbours": settings.neighbours,
        "label_issues": sum(issue["is_label_issue"] for issue in issues),
        "outliers": sum(issue["is_outlier"] for issue in issues),
        "conflicts": sum(bool(issue["conflict"]) for issue in issues),
        "near_duplicates": sum(bool(issue["near_duplicates"]) for issue in issues),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "audit.json").write_text(json.dumps(summary, indent=2))
    run_id = log_to_mlflow(cfg, folder, summary)
    print(
        f"Audit of {ingested.root}: {summary['images']} images, {summary['label_issues']} likely "
        f"label issues, {summary['outliers']} outliers, {summary['conflicts']} in two classes, "
        f"{summary['near_duplicates']} with a near duplicate\n"
        f"Report: {folder / 'audit.html'} (issues.csv: lowest label_score first)\n"
        f"MLflow run {run_id}\n"
        f"Leave the flagged images out of a run: data.exclude={folder / 'issues.csv'}"
    )
    return folder


def log_to_mlflow(cfg: DictConfig, folder: Path, summary: dict) -> str | None:
    """The report as an MLflow run of the configured experiment: counts as metrics, the
    settings as params, the files as artifacts under audit/."""
    mlflow_cfg = cfg.get("logger", {}).get("mlflow") if cfg.get("logger") else None
    if not mlflow_cfg:
        return None
    from sem_cls.tracking import experiment_for

    client, experiment_id = experiment_for(mlflow_cfg)
    run = client.create_run(experiment_id, run_name="audit", tags={"sem_cls.task": "audit"})
    run_id = run.info.run_id
    try:
        for key in ("data_dir", "backbone", "folds", "neighbours"):
            client.log_param(run_id, f"audit/{key}", summary[key])
        for key in ("images", "label_issues", "outliers", "conflicts", "near_duplicates"):
            client.log_metric(run_id, f"audit/{key}", summary[key])
        client.log_artifacts(run_id, str(folder), "audit")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


@hydra.main(version_base="1.3", config_path="../conf", config_name="audit")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    # Hydra composed cfg and checked it (sem_cls.config.schema.ConfigCheck) before this runs.
    audit(cfg)


if __name__ == "__main__":
    run_command(main)
