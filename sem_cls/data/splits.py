"""Leakage-safe splits: duplicate groups never straddle train/val/test (the algorithms; the
result is a SplitManifest, sem_cls.data.manifest).

Exact duplicates share a sha256 and near-duplicates a perceptual hash within a few bits; both
are joined into groups, and whole groups go to one split. About a fifth of the NFFA images have
a near-duplicate, so a split by file leaks test images into training.
"""

from collections import Counter

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from sem_cls.errors import UserError

SPLITS = ("train", "val", "test")
# Bits (of 64) two perceptual hashes may differ by and still be one image: re-encoded, resized,
# brightened or shifted by 1% stays within 6; distinct generated specimens are 14 or more apart
# (tests/test_splits.py checks both). Shifts of 2% and more can exceed it on periodic patterns.
NEAR_DUPLICATE_BITS = 8
# Rows of the pairwise-distance matrix per block: 512 x 21,000 bytes at a time.
_BLOCK = 512


def duplicate_groups(sha256s: list[str], phashes: list[str], max_bits: int) -> np.ndarray:
    """Group id per image: images joined by equal sha256 or phashes within `max_bits` bits."""
    count = len(sha256s)
    rows, cols = [], []
    first_of_sha = {}
    for index, sha in enumerate(sha256s):
        rows.append(first_of_sha.setdefault(sha, index))
        cols.append(index)
    if max_bits >= 0 and count:
        bits = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
        for start in range(0, count, _BLOCK):
            distances = np.bitwise_count(bits[start : start + _BLOCK, None] ^ bits[None, :])
            near_rows, near_cols = np.nonzero(distances <= max_bits)
            rows.extend(near_rows + start)
            cols.extend(near_cols)
    graph = coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    # Renumber by first member, so ids follow file order, not the graph library's.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))
    return order[labels]


def _group_labels(labels: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    """Each group's class: its most common one (a group mixing classes is a labelling slip)."""
    members: dict[int, Counter] = {}
    for label, group in zip(labels.tolist(), groups.tolist(), strict=True):
        members.setdefault(group, Counter())[label] += 1
    return {group: counts.most_common(1)[0][0] for group, counts in members.items()}


def group_split(
    labels: np.ndarray, groups: np.ndarray, ratios: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per image, by whole groups, stratified by class.

    Per class, groups in a seeded random order (largest first) each go to the split furthest
    below its target share, so the shares come out as close as whole groups allow.
    scikit-learn has no splitter for this: StratifiedGroupKFold only cuts 1/k shares (70/15/15
    becomes 71.4/14.3/14.3) and GroupShuffleSplit ignores classes, so rare ones miss a split.
    """
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"data.split={list(ratios)} must be three positive ratios summing to 1.")
    rng = np.random.default_rng(seed)
    sizes = Counter(groups.tolist())
    group_label = _group_labels(labels, groups)
    group_split_of = {}
    for label in sorted(set(group_label.values())):
        class_groups = [g for g, lab in group_label.items() if lab == label]
        rng.shuffle(class_groups)
        class_groups.sort(key=lambda g: -sizes[g])  # stable: ties keep the seeded order
        total = sum(sizes[g] for g in class_groups)
        filled = np.zeros(3)
        for group in class_groups:
            split = int(np.argmax(np.asarray(ratios) * total - filled))
            group_split_of[group] = split
            filled[split] += sizes[group]
    return np.array([group_split_of[g] for g in groups.tolist()])


def fold_split(
    labels: np.ndarray, groups: np.ndarray, split: np.ndarray, folds: int, fold: int, seed: int
) -> np.ndarray:
    """Cross-validation: train+val regrouped into `folds` folds; fold `fold` becomes val.

    The test split stays as it is, so every fold is tested on the same held-out images.
    """
    if not (isinstance(folds, int) and folds >= 2):
        raise UserError(f"data.folds={folds!r} must be an integer >= 2 (or null for no folds).")
    if not (isinstance(fold, int) and 0 <= fold < folds):
        raise UserError(f"data.fold={fold!r} must be an integer in 0..{folds - 1}.")
    pool = np.flatnonzero(split != 2)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        _, val = list(splitter.split(pool, labels[pool], groups[pool]))[fold]
    except ValueError as err:
        raise UserError(f"Cannot make {folds} folds of the training images: {err}") from err
    result = split.copy()
    result[pool] = 0
    result[pool[val]] = 1
    return result


def check_every_class_in_every_split(class_names, labels, split) -> None:
    for index, name in enumerate(class_names):
        counts = [int(np.sum((labels == index) & (split == s))) for s in range(3)]
        if min(counts) == 0:
            missing = [SPLITS[s] for s in range(3) if counts[s] == 0]
            raise UserError(
                f"Class {name!r} has too few images to split: train/val/test would get "
                f"{counts} images, none for {', '.join(missing)} (near-duplicates go together). "
                f"Add images to {name}, move its folder out of the data folder, or change "
                "data.split."
            )
