"""Metric keys of class names: any folder name, as a key MLflow (and Lightning's MLflow logger,
which silently drops every other character) keeps as it is, distinct for every class."""

import hashlib
import json
import re
import unicodedata
from pathlib import Path

from sem_cls.errors import UserError

# The characters Lightning's MLFlowLogger leaves in a metric key (it deletes the rest, so
# `Poröse` became `Porse` and `纳米线` an empty, illegal key); MLflow accepts them all.
KEPT = re.compile(r"[A-Za-z0-9_. -]+")


def metric_key(class_name: str) -> str:
    """`class_name` itself where every character is kept; otherwise its ASCII letters and an
    8-hex sha256 of the exact name: `Poröse` -> `Porose-749ce718`, `纳米线` -> `class-f0faca90`."""
    if KEPT.fullmatch(class_name):
        return class_name
    letters = unicodedata.normalize("NFKD", class_name).encode("ascii", "ignore").decode()
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", letters).strip("_.") or "class"
    return f"{readable}-{hashlib.sha256(class_name.encode()).hexdigest()[:8]}"


def metric_keys(class_names: list[str]) -> dict[str, str]:
    """Class name -> metric key, checked distinct."""
    keys = {name: metric_key(name) for name in class_names}
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if key in seen:  # only a name spelled like another's key: `Porose-749ce718` beside `Poröse`
            raise UserError(
                f"Class folders {seen[key]!r} and {name!r} would share the metric key {key!r}. "
                "Rename one of the two folders."
            )
        seen[key] = name
    return keys


def write_metric_keys(path: Path, class_names: list[str]) -> Path:
    """JSON of every class name -> its metric key (`val/recall/<key>`)."""
    keys = metric_keys(class_names)
    path.write_text(json.dumps(keys, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
