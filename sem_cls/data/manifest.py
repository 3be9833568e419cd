"""SplitManifest: which image of an ingested folder is in train, val or test, with its crop box;
built from an ingest, or read from the manifest.csv of an earlier run and checked against one."""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sem_cls.data import splits as split_lib
from sem_cls.data.exclude import exclude_listed
from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.samples import Sample
from sem_cls.data.scale import SCALE_FIELDS, read_scale
from sem_cls.errors import DataNotFoundError, UserError

if TYPE_CHECKING:  # for annotations only: the ingest CLI builds manifests, so no runtime import
    from sem_cls.data.ingest import Ingest

log = logging.getLogger(__name__)

SPLITS = split_lib.SPLITS
MANIFEST_FIELDS = (
    "path", "class", "split", "sha256", "group", "width", "height",
    "crop_left", "crop_top", "crop_right", "crop_bottom",
)  # fmt: skip
CROP_FIELDS = ("crop_left", "crop_top", "crop_right", "crop_bottom")
# Written after MANIFEST_FIELDS (empty where the file has no FEI or Zeiss metadata); not
# required when a manifest is read, so manifests of earlier runs stay reusable.
WRITTEN_FIELDS = (*MANIFEST_FIELDS, *SCALE_FIELDS)


def crop_rows(records: list[dict], info_bar) -> list[dict]:
    """Manifest rows (no split yet) of ingest records, with the crop box of `info_bar`."""
    crop = InfoBarCrop(info_bar)
    rows = []
    for record in records:
        box = crop.box(record["width"], record["height"], record["bar_top"])
        row = {key: record[key] for key in ("path", "class", "sha256", "width", "height")}
        row.update(zip(CROP_FIELDS, box, strict=True))
        rows.append(row)
    return rows


def sample_of(row: dict, label: int, root: Path) -> Sample:
    box = tuple(row[key] for key in CROP_FIELDS)
    return Sample(root / row["path"], label, box, (row["width"], row["height"]), row["sha256"])


def labelled_samples(ingested: Ingest, class_names: list[str], info_bar) -> list[Sample]:
    """Every usable image of another `<Class>/` folder (an external test set), labelled by
    `class_names` (a model's classes)."""
    unknown = sorted(set(ingested.class_names) - set(class_names))
    if unknown:
        raise UserError(
            f"External folder {ingested.root} has class folders {unknown} that the model does not "
            f"know. Known classes: {', '.join(class_names)}. Rename or remove those folders."
        )
    label_of = {name: index for index, name in enumerate(class_names)}
    rows = crop_rows(ingested.images, info_bar)
    return [sample_of(row, label_of[row["class"]], ingested.root) for row in rows]


def fingerprint(rows: list[dict]) -> str:
    """sha256 over (path, class, split, content sha256) of every row: same split, same print."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["path"]):
        digest.update(f"{row['path']}\t{row['class']}\t{row['split']}\t{row['sha256']}\n".encode())
    return digest.hexdigest()


def read_manifest(path: Path) -> list[dict]:
    """The rows of a manifest.csv, numbers as numbers."""
    if not path.is_file():
        raise UserError(f"data.manifest={path} does not exist; give a manifest.csv of a run.")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(MANIFEST_FIELDS) - set(rows[0] if rows else MANIFEST_FIELDS)
    if missing or not rows:
        raise UserError(
            f"data.manifest={path} is not a sem-cls manifest: "
            + (f"columns {sorted(missing)} are missing." if missing else "it has no rows.")
        )
    numeric = ("group", "width", "height", *CROP_FIELDS)
    for row in rows:
        row.update({key: int(row[key]) for key in numeric})
    return rows


@dataclass(frozen=True)
class SplitManifest:
    """One row per image of `root`: path, class, split, sha256, duplicate group, size, crop box."""

    root: Path
    rows: list[dict]

    @classmethod
    def build(
        cls,
        ingested: Ingest,
        ratios=(0.7, 0.15, 0.15),
        seed: int = 42,
        near_duplicate_bits: int = split_lib.NEAR_DUPLICATE_BITS,
        folds: int | None = None,
        fold: int = 0,
        info_bar="auto",
    ) -> SplitManifest:
        """Split by duplicate groups, stratified and seeded (sem_cls.data.splits); with `folds`,
        fold `fold` of train+val becomes val."""
        records = ingested.images
        label_of = {name: index for index, name in enumerate(ingested.class_names)}
        labels = np.array([label_of[r["class"]] for r in records])
        groups = split_lib.duplicate_groups(
            [r["sha256"] for r in records], [r["phash"] for r in records], near_duplicate_bits
        )
        split = split_lib.group_split(labels, groups, tuple(ratios), seed)
        if folds is not None:
            split = split_lib.fold_split(labels, groups, split, folds, fold, seed)
        split_lib.check_every_class_in_every_split(ingested.class_names, labels, split)
        rows = crop_rows(records, info_bar)
        for row, group, index in zip(rows, groups.tolist(), split.tolist(), strict=True):
            row.update(group=group, split=SPLITS[index])
            row.update(read_scale(ingested.root / row["path"]))  # a TIFF's header; else empty
        return cls(ingested.root, rows)._logged()

    @classmethod
    def read(cls, path: Path | str, ingested: Ingest) -> SplitManifest:
        """The split of a manifest.csv, if every image is still in `ingested`, usable and
        unchanged."""
        rows = read_manifest(Path(path))
        current = {r["path"]: r["sha256"] for r in ingested.images}
        changed = [row["path"] for row in rows if current.get(row["path"]) != row["sha256"]]
        # A manifest of the time before label conflicts were left out may hold them.
        conflicts = {r["path"] for r in ingested.rejected if r["error"].startswith("label conf")}
        conflicting = [path for path in changed if path in conflicts]
        if conflicting:
            raise UserError(
                f"{len(conflicting)} images of data.manifest={path} have the same content as an "
                f"image of another class and were left out (label conflicts), e.g. "
                f"{', '.join(conflicting[:3])}. Add data.label_conflicts=keep to reuse this "
                "split as it is, or drop data.manifest to split anew without them."
            )
        if changed:
            raise UserError(
                f"{len(changed)} images of data.manifest={path} are missing, "
                f"unusable or changed in {ingested.root}, e.g. {', '.join(changed[:3])}. Use the "
                "data the manifest was made from, or drop data.manifest to split anew."
            )
        return cls(ingested.root, rows)._logged()

    @classmethod
    def resumed(cls, path: Path, ingested: Ingest) -> SplitManifest:
        """The split a run was started with (its manifest.csv at `path`), for continuing it: an
        image removed or changed since is left out and named in the log; an image added since is
        not used (a resumed run is the same run; a new run splits the folder as it is now)."""
        rows = read_manifest(path)
        current = {r["path"]: r["sha256"] for r in ingested.images}
        kept = [row for row in rows if current.get(row["path"]) == row["sha256"]]
        gone = [row["path"] for row in rows if row["path"] not in current]
        changed = [
            row["path"] for row in rows if current.get(row["path"], row["sha256"]) != row["sha256"]
        ]
        if gone or changed:
            log.warning(
                "%d images of the run's split are gone from %s and %d have changed since it "
                "started; the run continues without them: %s",
                len(gone), ingested.root, len(changed), ", ".join(gone + changed),
            )  # fmt: skip
        added = len(set(current) - {row["path"] for row in rows})
        if added:
            log.warning(
                "%d images were added to %s since the run started; a resumed run keeps its split "
                "and does not use them. A new run (without resume=) splits the folder as it is "
                "now.",
                added, ingested.root,
            )  # fmt: skip
        names = sorted({row["class"] for row in rows})
        for name in names:
            empty = [
                s for s in SPLITS if not any(r["class"] == name and r["split"] == s for r in kept)
            ]
            if empty:
                raise UserError(
                    f"The run's split in {path} has no images of class {name!r} left in "
                    f"{', '.join(empty)}: images were removed from {ingested.root} since the run "
                    "started. Put them back to resume it, or start a new run without resume=."
                )
        return cls(ingested.root, kept)._logged()

    @classmethod
    def from_config(cls, data, ingested: Ingest) -> SplitManifest:
        """`data.manifest` read and checked, or a new split as the `data` config says."""
        if len(ingested.class_names) < 2:
            raise DataNotFoundError(
                f"data.data_dir={ingested.root} holds usable images of "
                f"{len(ingested.class_names)} class ({', '.join(ingested.class_names) or 'none'}); "
                "a classifier needs two or more class folders, <Class>/*.jpg. Add the other "
                "classes' folders, or point data.data_dir at them."
            )
        if data.get("exclude"):
            if data.get("manifest"):
                raise UserError(
                    f"data.exclude and data.manifest={data.manifest} are both set: a manifest "
                    "is a split reused exactly. Drop data.manifest to split anew without the "
                    "excluded images."
                )
            exclude_listed(ingested, data.exclude)
        if data.get("manifest"):
            return cls.read(data.manifest, ingested)
        return cls.build(
            ingested,
            data.split,
            data.seed,
            data.near_duplicate_bits,
            data.get("folds"),
            data.get("fold", 0),
            data.info_bar,
        )

    def _logged(self) -> SplitManifest:
        counts = {name: sum(row["split"] == name for row in self.rows) for name in SPLITS}
        log.info(
            "%d images in %d classes from %s; split %s",
            len(self.rows), len(self.class_names), self.root, counts,
        )  # fmt: skip
        return self

    @property
    def class_names(self) -> list[str]:
        return sorted({row["class"] for row in self.rows})

    def fingerprint(self) -> str:
        """sha256 over (path, class, split, content) of every image: equal splits, equal prints."""
        return fingerprint(self.rows)

    def write(self, path: Path) -> Path:
        """manifest.csv, reusable as data.manifest."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=WRITTEN_FIELDS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def samples(self, split: str) -> list[Sample]:
        """The images of `split`, in manifest order, paths resolved against the data root."""
        label_of = {name: index for index, name in enumerate(self.class_names)}
        rows = [row for row in self.rows if row["split"] == split]
        return [sample_of(row, label_of[row["class"]], self.root) for row in rows]
