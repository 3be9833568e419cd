"""`data.exclude`: images of a data folder left out of a new split without touching any file, listed
in a CSV with a `path` column (an audit's issues.csv: its flagged rows), a text file of paths, one
per line, or a list of paths in the config; every path relative to `data.data_dir`."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sem_cls.errors import UserError

if TYPE_CHECKING:
    from sem_cls.data.ingest import Ingest

log = logging.getLogger(__name__)

# An audit's issues.csv lists every image; these columns say which ones it flags.
FLAG_COLUMNS = ("is_label_issue", "is_outlier", "conflict")


def read_exclude_list(exclude) -> list[str]:
    """The paths `exclude` names: a file (.csv with a `path` column, else one path per line) or
    a list of paths."""
    if not isinstance(exclude, str):
        return [str(path) for path in exclude]
    path = Path(exclude)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise UserError(
            f"data.exclude={exclude} cannot be read ({reason}). Give an audit's issues.csv, a "
            "CSV with a `path` column, a text file with one image path per line, or a list: "
            "data.exclude=[Class/a.jpg,Class/b.jpg]."
        ) from None
    if path.suffix.lower() != ".csv":
        return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "path" not in rows[0]:
        raise UserError(
            f"data.exclude={exclude} has no `path` column (or no rows): give an audit's "
            "issues.csv or a CSV whose `path` column holds the images to leave out."
        )
    if all(column in rows[0] for column in FLAG_COLUMNS):
        rows = [row for row in rows if _flagged(row)]
    return [row["path"] for row in rows]


def _flagged(row: dict) -> bool:
    return row["is_label_issue"] == "True" or row["is_outlier"] == "True" or bool(row["conflict"])


def exclude_listed(ingested: Ingest, exclude: str | Iterable[str]) -> list[dict]:
    """Leave the images `exclude` names out of `ingested` (moved from its images to its files
    left out, with the reason, so the run's ingest report lists them); the records left out. A
    listed path that is not in the folder is refused: a list of another folder excludes nothing."""
    listed = set(read_exclude_list(exclude))
    known = {record["path"] for record in ingested.images + ingested.rejected}
    unknown = sorted(listed - known)
    if unknown:
        raise UserError(
            f"data.exclude={exclude} names {len(unknown)} images that are not in "
            f"{ingested.root}, e.g. {', '.join(unknown[:3])}. Paths are relative to "
            "data.data_dir, as in an audit's issues.csv of this folder."
        )
    source = exclude if isinstance(exclude, str) else "a list"
    excluded = [record for record in ingested.images if record["path"] in listed]
    ingested.images[:] = [record for record in ingested.images if record["path"] not in listed]
    ingested.rejected.extend(
        {**record, "error": f"excluded by data.exclude ({source})"} for record in excluded
    )
    log.info("Excluded %d images listed in %s; no file was changed.", len(excluded), source)
    print(f"Excluded {len(excluded)} images listed in data.exclude ({source}).")
    return excluded
