"""The generated set on disk: file names, info-bar draws, parallel writing, and the marker that
tells a complete set of this generator's from anything else (which is never replaced)."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile

import numpy as np

from sem_cls.data.synthetic.instrument import render_image
from sem_cls.data.synthetic.renderers import CLASSES
from sem_cls.errors import OutOfSpace, UserError, is_out_of_space

MARKER_NAME = ".sem_cls_synthetic.json"
DESCRIPTION = "Write the built-in SEM-like dataset: the 10 NFFA-Europe classes in the NFFA layout."
# Bumped whenever the images change, so a set written by an older generator is rebuilt.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
# Seed-sequence slot for the info-bar draw; class indices (0-9) never take it.
_INFO_BAR_STREAM = 10_000


def info_bar_kind(seed: int, image_index: int, info_bar_share: float) -> str | None:
    """Info bar of image `image_index`: None, "bright" (4 in 5) or "dark".

    Drawn from (seed, index) alone, so every class gets the same bars and a bar never tells
    the class.
    """
    has_bar, dark = np.random.default_rng([seed, _INFO_BAR_STREAM, image_index]).random(2)
    if has_bar >= info_bar_share:
        return None
    return "dark" if dark < 0.2 else "bright"


def image_name(seed: int, class_name: str, image_index: int) -> str:
    """NFFA-style file name, L<k>_<md5>.jpg, fixed by (seed, class, index)."""
    digest = hashlib.md5(f"{seed}/{class_name}/{image_index}".encode()).hexdigest()
    return f"L{int(digest[0], 16) % 8 + 1}_{digest}.jpg"


def _write_image(job: tuple) -> tuple[str, str, str | None]:
    directory, seed, class_index, image_index, size, bar = job
    class_name = CLASSES[class_index]
    rng = np.random.default_rng([seed, class_index, image_index])
    name = image_name(seed, class_name, image_index)
    render_image(class_name, rng, size, bar).save(
        pathlib.Path(directory) / class_name / name, "JPEG", quality=JPEG_QUALITY
    )
    return class_name, name, bar


def _read_marker(root: pathlib.Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(root: pathlib.Path, params: dict) -> bool:
    marker = _read_marker(root)
    if marker is None or marker.get("params") != params:
        return False
    files = marker.get("files", {})
    expected = params["images_per_class"]
    return all(
        len(files.get(c, [])) == expected
        and all((root / c / f["name"]).is_file() for f in files[c])
        for c in CLASSES
    )


def _listed_files(marker: dict) -> set[str]:
    """The relative paths a marker says the generator wrote, marker included."""
    files = marker.get("files")
    listed = {MARKER_NAME}
    if isinstance(files, dict):
        for class_name, entries in files.items():
            for entry in entries if isinstance(entries, list) and class_name in CLASSES else []:
                name = entry.get("name") if isinstance(entry, dict) else None
                # Plain names only: a marker must never point the clean-up outside its folder.
                if isinstance(name, str) and pathlib.PurePath(name).name == name != "..":
                    listed.add(f"{class_name}/{name}")
    return listed


def _foreign_entries(root: pathlib.Path) -> list[str]:
    """What under `root` the generator did not write; empty when the whole folder is its own.

    A folder is the generator's when its marker lists every file in it: a user who drops
    images into a generated set, or keeps NFFA-named folders of their own, gets them listed.
    """
    if not os.path.lexists(root):
        return []
    if root.is_symlink() or not root.is_dir():  # through a link the files may be anyone's
        return [root.name]
    marker = _read_marker(root)
    if marker is None:
        return sorted(p.name for p in root.iterdir())
    listed = _listed_files(marker)
    foreign = []
    for top in sorted(root.iterdir()):
        if top.name == MARKER_NAME and top.is_file() and not top.is_symlink():
            continue
        # Class folders must be real folders: through a link, the files would be someone else's.
        if top.name not in CLASSES or top.is_symlink() or not top.is_dir():
            foreign.append(top.name)
            continue
        for path in sorted(top.iterdir()):
            relative = f"{top.name}/{path.name}"
            if relative not in listed or path.is_symlink() or not path.is_file():
                foreign.append(relative)
    return foreign


def _refuse_foreign(root: pathlib.Path) -> None:
    """Stop unless `root` is missing, empty, or a set this generator wrote and nobody added to."""
    foreign = _foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        why = "" if _read_marker(root) else f", and it has no marker file {MARKER_NAME}"
        raise UserError(
            f"{root} holds files the SEM-like set generator did not write ({shown}{why}); they "
            "are left as they are and nothing was written there. Choose another folder for the "
            "generated set."
        )


def _remove_generated(old: pathlib.Path, marker: dict) -> list[str]:
    """Delete the files `marker` lists under `old`, then the emptied folders; return the rest.

    Only listed files go, so a file someone added after the check survives.
    """
    for relative in sorted(_listed_files(marker) - {MARKER_NAME}):
        (old / relative).unlink(missing_ok=True)
    (old / MARKER_NAME).unlink(missing_ok=True)
    for class_name in CLASSES:
        try:
            (old / class_name).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            continue
    try:
        old.rmdir()
    except OSError:
        return sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if not p.is_dir())
    return []


def _swap_in(root: pathlib.Path, fresh: pathlib.Path) -> None:
    """Move the complete `fresh` set to `root`; an earlier generated set there is removed."""
    if not os.path.lexists(root):
        fresh.rename(root)
        return
    _refuse_foreign(root)  # again: files may have arrived while the new set was drawn
    marker = _read_marker(root) or {}
    # A fresh holder folder, so the old set's temporary name can never be taken already.
    holder = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    old = holder / root.name
    root.rename(old)
    fresh.rename(root)
    left = _remove_generated(old, marker)
    if left:
        raise UserError(
            f"Files appeared in {root} while the generated set was replaced; they are kept in "
            f"{old}: {', '.join(left[:5])}."
        )
    holder.rmdir()


def generate_dataset(
    root,
    images_per_class: int,
    seed: int = 0,
    info_bar_share: float = 0.6,
    size: tuple[int, int] = (1024, 768),
    workers: int = 2,
) -> pathlib.Path:
    """Write `images_per_class` images per class under `root`/<Class>/ and return `root`.

    A marker file records the parameters and every file; when it matches and the files are
    there, nothing is written. The set is built in a sibling directory and moved in when
    complete, so an interrupted run never looks finished. An existing `root` is replaced only
    when it is empty or a set written here whose marker lists every file in it; anything
    else raises UserError and is left untouched.
    """
    root = pathlib.Path(root)
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, not {images_per_class}")
    if not 0 <= info_bar_share <= 1:
        raise ValueError(f"info_bar_share must be within [0, 1], not {info_bar_share}")
    size = (int(size[0]), int(size[1]))
    params = {
        "generator_version": GENERATOR_VERSION,
        "images_per_class": int(images_per_class),
        "seed": int(seed),
        "info_bar_share": float(info_bar_share),
        "size": list(size),
    }
    if _is_complete(root, params):
        return root
    _refuse_foreign(root)

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        # mkdtemp makes a new folder, so the staging area is never one that was already there.
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise UserError(
            f"The SEM-like set cannot be written to {root}: {err.strerror} ({err.filename}). Set "
            "data.data_dir to a folder you can write, e.g. data.data_dir=$HOME/sem-demo."
        ) from None
    for class_name in CLASSES:
        (staging / class_name).mkdir(parents=True)
    bars = [info_bar_kind(seed, i, info_bar_share) for i in range(images_per_class)]
    jobs = [
        (str(staging), seed, c, i, size, bars[i])
        for c in range(len(CLASSES))
        for i in range(images_per_class)
    ]
    try:
        if workers <= 1:
            written = [_write_image(job) for job in jobs]
        else:
            # spawn: safe whatever threads the caller (e.g. torch) has started
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(jobs))) as pool:
                chunk = max(1, len(jobs) // (workers * 8))
                written = pool.map(_write_image, jobs, chunksize=chunk)
        files = {c: [] for c in CLASSES}
        for class_name, name, bar in written:
            files[class_name].append({"name": name, "info_bar": bar})
        (staging / MARKER_NAME).write_text(json.dumps({"params": params, "files": files}, indent=1))
        _swap_in(root, staging)
    except OSError as err:
        if not is_out_of_space(err):
            raise
        needed = images_per_class * len(CLASSES) * size[0] * size[1] // 8  # JPEG, about 1:8
        raise OutOfSpace(root, needed, "data.data_dir") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--root", default="data/synthetic", help="output folder")
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--info-bar-share",
        type=float,
        default=0.6,
        help="share of images with an instrument info bar at the bottom",
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        root = generate_dataset(
            args.root,
            args.images_per_class,
            seed=args.seed,
            info_bar_share=args.info_bar_share,
            size=(args.width, args.height),
            workers=args.workers,
        )
    except UserError as err:
        parser.exit(2, f"{err}\n")
    total = args.images_per_class * len(CLASSES)
    print(f"{total} images ({args.images_per_class} per class, {len(CLASSES)} classes) in {root}")
