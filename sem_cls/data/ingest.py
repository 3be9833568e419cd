"""Ingest: check every file of a `<root>/<Class>/` folder once, and hash and measure the good ones.

A file that cannot be used (zero bytes, truncated, not an image, too large) is reported and
left out, so no bad file can stop a training run halfway. Files in subfolders of a class folder
belong to that class; symbolic links are followed. Results are cached per file (path, size and
modification time), so a second ingest of the same folder reads only what changed; a file that
could not be read this time (an OS error) is reported but checked again next time. The same
content under two class folders (a copy, or a link to another class's file) is a label conflict:
reported, and left out unless `label_conflicts` says to keep them or to refuse the folder.

The command line, `python -m sem_cls.ingest`, is in sem_cls/ingest.py.
"""

import contextlib
import csv
import errno
import hashlib
import io
import logging
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from sem_cls.data.conflicts import LABEL_CONFLICTS, resolve_label_conflicts
from sem_cls.data.images import (
    DEFAULT_MAX_PIXELS,
    check_max_pixels,
    is_image_file,
    open_image,
    page_count,
    walk_files,
)
from sem_cls.data.infobar import detect_bar_top
from sem_cls.data.metric_keys import write_metric_keys
from sem_cls.data.workers import die_with_parent
from sem_cls.errors import DataNotFoundError, UserError

log = logging.getLogger(__name__)

# Bumped when what a check records changes, so cached checks of older versions are redone.
# 2: EXIF orientation applied (upright width, height, bar row); page count of multi-page TIFFs.
INGEST_VERSION = 2
# Bar detection and the perceptual hash need row statistics and a 32x32 thumbnail, not full
# resolution: JPEGs decode at a quarter of 1024x768, which is four times cheaper.
ANALYSIS_SIDE = 192
RECORD_FIELDS = (
    "path", "class", "bytes", "mtime_ns", "width", "height", "sha256", "phash", "bar_top", "pages",
    "error",
)  # fmt: skip
# Set on a record whose file could not be read (an OS error): not a verdict on the file, so it is
# not cached and the file is checked again by the next ingest.
RETRY = "retry"


@dataclass
class Ingest:
    """The usable images of a folder and the files left out, one record (dict) each."""

    root: Path
    class_names: list[str]
    images: list[dict]
    rejected: list[dict] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    # Images kept although their content is also in another class (label_conflicts=keep).
    conflicts_kept: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.images) + len(self.rejected)
        text = f"{len(self.images):,} of {total:,} files in {len(self.class_names)} classes usable"
        if self.rejected:
            reasons = Counter(_reason(record["error"]) for record in self.rejected)
            listed = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
            text += f"; left out {len(self.rejected):,} ({listed})"
        if self.conflicts_kept:
            text += f"; kept {len(self.conflicts_kept):,} under two or more labels"
        return text

    def write_report(self, path: Path) -> Path:
        """CSV of the files left out, and of label conflicts kept: path, class, why."""
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "class", "error"])
            writer.writeheader()
            for record in self.rejected + self.conflicts_kept:
                writer.writerow({k: record[k] for k in ("path", "class", "error")})
        return path


def _reason(error: str) -> str:
    """Short category of an error message, for the summary line."""
    lowered = error.lower()
    for key, reason in (
        ("0 bytes", "empty"),
        ("truncated", "truncated"),
        ("not an image file", "not an image"),
        ("max_pixels", "too large"),
        ("symlink loop", "symlink loop"),
        ("label conflict", "label conflict"),
    ):
        if key in lowered:
            return reason
    return "unreadable"


def check_image(
    path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None
) -> dict:
    """Size, sha256, perceptual hash and info-bar top row of one image, or why it is unusable.
    `data`: the file's bytes where they were read already (an object from a store)."""
    record = {"width": 0, "height": 0, "sha256": "", "phash": "", "bar_top": 0, "pages": 0}
    record["error"] = ""
    try:
        data = path.read_bytes() if data is None else data
    except OSError as err:  # the disk, permissions, a link: the file may be fine next time
        return {**record, "error": read_error(path, err), RETRY: True}
    try:
        if not data:
            raise ValueError("empty file (0 bytes)")
        record["sha256"] = hashlib.sha256(data).hexdigest()
        gray, (width, height) = open_image(io.BytesIO(data), "L", ANALYSIS_SIDE, max_pixels)
        bar_top = detect_bar_top(np.asarray(gray))
        # The bar's text differs between otherwise identical images: hash the specimen only.
        record["phash"] = str(imagehash.phash(gray.crop((0, 0, gray.width, bar_top))))
        record.update(width=width, height=height, bar_top=round(bar_top * height / gray.height))
        record["pages"] = page_count(io.BytesIO(data))
    except Exception as err:  # any failure to read makes the file unusable, and is reported
        record["error"] = unusable(path, err)
    return record


def read_error(path: Path, err: OSError) -> str:
    """Why a file could not be read (an OS error), as ingest reports it."""
    reason = err.strerror or type(err).__name__
    if path.is_dir() or err.errno == errno.ELOOP:  # only a walk's loop yields a folder here
        reason = "symlink loop"
    return f"could not be read: {reason}"


def unusable(path: Path, err: Exception) -> str:
    """Why an image file's bytes cannot be used, as ingest reports it."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file: no image format recognised in its bytes"
    return f"{type(err).__name__}: {err}".replace(f"{path}", path.name)


def bar_top_of(image: Image.Image, data: bytes, height: int) -> int:
    """The info bar's top row in the original's `height` rows, as check_image records it,
    found on `image` (an 8-bit decode of `data`, the file's bytes, at any JPEG reduction)
    brought to check_image's grayscale analysis size: for a caller that decodes once."""
    with Image.open(io.BytesIO(data)) as probe:
        probe.draft("L", (ANALYSIS_SIDE, ANALYSIS_SIDE))  # no change but for JPEGs
        analysis_side = max(probe.size)  # the long side: an EXIF rotation does not change it
    gray = image.convert("L")
    # A power of two (both are JPEG reductions of one file); reduce() rounds up as JPEG does.
    factor = round(max(gray.size) / analysis_side)
    if factor > 1:
        gray = gray.reduce(factor)
    return round(detect_bar_top(np.asarray(gray)) * height / gray.height)


def _check(job: tuple[Path, int]) -> dict:
    return check_image(*job)


def _cache_file(cache_dir: Path, root: Path, max_pixels: int) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{root.name}-{key}-v{INGEST_VERSION}-{max_pixels}.csv"


def _read_cache(path: Path | None) -> dict[str, dict]:
    """Cached checks by path; a damaged cache file is discarded (it is rebuilt by this ingest)."""
    if path is None or not path.is_file():
        return {}
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if any(set(row) != set(RECORD_FIELDS) for row in rows):
            raise ValueError("columns differ from a cache file's")
        return {row["path"]: _typed(row) for row in rows}
    except (OSError, ValueError, TypeError, csv.Error) as err:
        log.warning("Ingest cache %s is unreadable (%s); checking every file again.", path, err)
        return {}


def _write_cache(path: Path, records: list[dict]) -> None:
    partial = path.with_suffix(f".partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(record for record in records if not record.get(RETRY))
        os.replace(partial, path)
    except OSError as err:  # a shared read-only cache, a full disk: the ingest itself is done
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        log.warning(
            "Ingest cache %s cannot be written (%s); the run goes on, and the next ingest "
            "checks every file again. Set paths.cache_dir to a folder you can write to keep it.",
            path, err.strerror or err,
        )  # fmt: skip


def _typed(record: dict) -> dict:
    """CSV strings back to numbers."""
    for key in ("bytes", "mtime_ns", "width", "height", "bar_top", "pages"):
        record[key] = int(record[key])
    return record


def ingest(
    root: Path | str,
    cache_dir: Path | str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    progress: bool = True,
    label_conflicts: str = "drop",
) -> Ingest:
    """Check every file under `root`/<Class>/ (only those new or changed since the last ingest);
    images whose content is also under another class are handled as `label_conflicts` says:
    drop (left out and reported), keep (reported) or refuse (UserError)."""
    root = Path(root)
    check_max_pixels(max_pixels)
    if label_conflicts not in LABEL_CONFLICTS:
        raise UserError(
            f"data.label_conflicts={label_conflicts} is not one of {', '.join(LABEL_CONFLICTS)}: "
            "drop leaves out images whose content is also in another class folder, keep trains "
            "on them with both labels, refuse stops."
        )
    if not root.is_dir():
        raise DataNotFoundError(f"Data folder {root} does not exist.")
    # A class is a top-level folder (or link to one); everything under it is its images.
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    cache_file = _cache_file(Path(cache_dir), root, max_pixels) if cache_dir else None
    records, to_check = _file_records(root, class_dirs, _read_cache(cache_file))
    if to_check:
        checked = _check_images(
            [path for _, path in to_check], max_pixels, workers, progress, root.name
        )
        for (index, _), result in zip(to_check, checked, strict=True):
            records[index].update(result)
        if cache_file:
            _write_cache(cache_file, records)

    images = [r for r in records if not r["error"]]
    rejected = [r for r in records if r["error"]]
    images, dropped, kept = resolve_label_conflicts(root, images, label_conflicts)
    rejected += dropped
    usable = {r["class"] for r in images}
    empty = [d.name for d in class_dirs if d.name not in usable]
    if empty:
        log.warning(
            "Class folders with no usable image, left out: %s (in %s).", ", ".join(empty), root
        )
    if not images:
        raise DataNotFoundError(
            f"Data folder {root} holds no <Class>/ folders with usable images "
            f"({', '.join(s.lstrip('.') for s in sorted({'.jpg', '.png', '.tif', '.bmp'}))})."
        )
    result = Ingest(root, sorted(usable), images, rejected, empty, kept)
    _log_findings(result)
    return result


def _file_records(root: Path, class_dirs: list[Path], cached: dict[str, dict]):
    """One record per file under the class folders: a cached check where the file is unchanged,
    the walk's or the suffix's verdict, or a blank record to fill. Returns the records and the
    (index, path) of each file still to check."""
    records, to_check = [], []
    for class_dir in class_dirs:
        for path, error in walk_files(class_dir):
            relative = path.relative_to(root).as_posix()
            record = {"path": relative, "class": class_dir.name, "bytes": 0, "mtime_ns": 0}
            record.update(width=0, height=0, sha256="", phash="", bar_top=0, pages=0, error=error)
            try:
                stat = path.stat()
            except OSError as err:
                error = error or f"could not be read: {err.strerror}"
                stat = None
            if error:
                record.update(error=error, retry=True)  # a walk's finding is made again every walk
            elif not is_image_file(path):
                record.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
                record["error"] = f"not an image file (suffix {path.suffix or 'none'!r})"
            else:
                record.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
                hit = cached.get(relative)
                if hit and (hit["bytes"], hit["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
                    record = hit
                else:
                    to_check.append((len(records), path))
            records.append(record)
    return records, to_check


def _check_images(
    paths: list[Path], max_pixels: int, workers: int, progress: bool, folder_name: str
) -> list[dict]:
    """`check_image` of every path, in order; in `workers` processes for more than 64 files."""
    jobs = [(path, max_pixels) for path in paths]
    bar = dict(total=len(jobs), desc=f"Checking images in {folder_name}", disable=not progress)
    if workers > 1 and len(jobs) > 64:
        # fork: workers start at once, without re-importing the caller's modules (torch);
        # they only decode and hash.
        # Workers are killed with this process, even by SIGKILL (no orphans decoding on).
        pool = ProcessPoolExecutor(
            workers,
            mp_context=get_context("fork"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )
        with pool:
            return list(tqdm(pool.map(_check, jobs, chunksize=32), **bar))
    return [_check(job) for job in tqdm(jobs, **bar)]


def _log_findings(result: Ingest) -> None:
    """The summary, multi-page images and the first files left out, in the log."""
    log.info("Ingest of %s: %s", result.root, result.summary())
    multi_page = [f"{r['path']} ({r['pages']} pages)" for r in result.images if r["pages"] > 1]
    if multi_page:
        listed = ", ".join(multi_page[:20]) + (", ..." if len(multi_page) > 20 else "")
        log.warning("%d multi-page images, of which the first page is used: %s",
                    len(multi_page), listed)  # fmt: skip
    for record in result.rejected[:20]:
        log.warning("Left out %s: %s", record["path"], record["error"])
    if len(result.rejected) > 20:
        log.warning(
            "... and %d more; all are listed in the ingest report.", len(result.rejected) - 20
        )


def ingest_folder(data, folder: Path | str | None = None) -> Ingest:
    """Ingest of a folder with the settings of a `data` config (cache, max_pixels, workers):
    `data.data_dir` by default, generated first where `data.synthetic` asks for the built-in
    set, and with `data.missing_hint` when it is not there; or another `folder` as it is."""
    settings = dict(
        cache_dir=Path(data.cache_dir) / "ingest" if data.get("cache_dir") else None,
        max_pixels=data.get("max_pixels", DEFAULT_MAX_PIXELS),
        workers=max(1, data.get("num_workers", 2)),
        label_conflicts=data.get("label_conflicts", "drop"),
    )
    if folder is not None:
        return ingest(folder, **settings)
    data_dir = Path(data.data_dir)
    if data.get("synthetic"):
        from sem_cls.data.synthetic import generate_dataset

        try:
            generate_dataset(data_dir, **data.synthetic)
        except UserError as err:
            raise UserError(
                f"{err} To train on {data_dir} as it is, add data.synthetic=null; "
                "to generate the built-in set, give another data.data_dir."
            ) from None
    require_data_folder(data)
    try:
        result = ingest(data_dir, **settings)
    except DataNotFoundError as err:  # there, but no usable <Class>/ folder: the same hint
        raise DataNotFoundError(f"{err} {data.get('missing_hint') or ''}".strip()) from None
    print(f"Ingest of {data_dir}: {result.summary()}")
    return result


def require_data_folder(data) -> None:
    """Refuse a `data.data_dir` that is not a folder, unless `data.synthetic` generates it,
    with `data.missing_hint`. It needs no torch: entry points call it before their heavy
    imports, so a missing folder is refused in a second."""
    data_dir = Path(data.data_dir)
    if not data.get("synthetic") and not data_dir.is_dir():
        hint = data.get("missing_hint") or ""
        raise DataNotFoundError(f"Data folder {data_dir} does not exist. {hint}".strip())


def write_data_files(folder: Path, manifest, ingested: Ingest) -> Path:
    """manifest.csv (the split, reusable as data.manifest), ingest_report.csv (files left
    out, and why) and metric_keys.json (each class's name in metric keys) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write(folder / "manifest.csv")
    ingested.write_report(folder / "ingest_report.csv")
    write_metric_keys(folder / "metric_keys.json", manifest.class_names)
    return folder


if __name__ == "__main__":
    # The command moved up a layer (data/ imports nothing above it); say so rather than exit 0.
    print("Error: run `python -m sem_cls.ingest` (same options) instead.", file=sys.stderr)
    raise SystemExit(2)
