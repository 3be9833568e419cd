"""The audit's work after the features, at the size of NFFA-Europe: 21,000 feature vectors of
InceptionV3's width (2048), 10 classes, 2% of the labels flipped; time per step and peak memory.

    python bench/audit.py [--images 21000] [--width 2048] [--no-map]

The vectors are drawn around one centre per class (unequal class sizes, as NFFA's), so the
classifier and the neighbour graph do the work real features give them. Extraction is not
included: that is the feature cache's (docs/performance.md, sections 1 and 2).
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sem_cls.audit import (  # noqa: E402
    label_issues,
    near_duplicates,
    neighbour_graph,
    out_of_fold_probabilities,
    outlier_scores,
)


def vectors(images: int, width: int, classes: int, seed: int = 0):
    """Features around a centre per class (ReLU-like, non-negative), labels with 2% flipped."""
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(classes, 2.0))
    labels = rng.choice(classes, images, p=shares)
    centres = rng.gamma(1.0, 1.0, (classes, width)).astype(np.float32)
    features = centres[labels] + rng.gamma(1.0, 0.8, (images, width)).astype(np.float32)
    flipped = rng.choice(images, images // 50, replace=False)
    given = labels.copy()
    given[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return features, given, flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=21_000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--no-map", action="store_true", help="leave out the t-SNE map")
    args = parser.parse_args()

    features, labels, flipped = vectors(args.images, args.width, args.classes)
    groups = np.arange(len(labels))  # no duplicates among drawn vectors
    times = {}
    started = time.perf_counter()

    def step(name, function, *inputs):
        begin = time.perf_counter()
        result = function(*inputs)
        times[name] = round(time.perf_counter() - begin, 1)
        print(f"{name}: {times[name]} s", flush=True)
        return result

    probabilities = step("out-of-fold probabilities (5 folds)", out_of_fold_probabilities,
                         features, labels, groups, 5, 42)  # fmt: skip
    scores, is_issue = step("cleanlab label issues", label_issues, labels, probabilities)
    distances, indices = step("k-NN graph (k=10, cosine)", neighbour_graph, features, 10)
    step("outliers and near duplicates", lambda: (outlier_scores(distances),
                                                  near_duplicates(distances, indices)))  # fmt: skip
    if not args.no_map:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        reduced = step("PCA to 50", lambda: PCA(50, random_state=42).fit_transform(features))
        step("t-SNE map", lambda: TSNE(2, init="pca", random_state=42).fit_transform(reduced))
    total = round(time.perf_counter() - started, 1)
    found = len(set(np.argsort(scores)[: len(flipped)].tolist()) & set(flipped.tolist()))
    result = {
        "images": args.images,
        "width": args.width,
        "seconds": total,
        "steps": times,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "flipped_in_lowest_scores": f"{found} of {len(flipped)}",
        "label_issues": int(is_issue.sum()),
        "cpus": os.cpu_count(),
        "load_average": [round(value, 1) for value in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
