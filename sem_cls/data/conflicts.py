"""Label conflicts: the same content (sha256) under two or more class folders, a copy or a link
to another class's file. Left out, kept with both labels, or refused, as data.label_conflicts
says; every one is reported."""

import logging
from pathlib import Path

from sem_cls.errors import UserError

log = logging.getLogger(__name__)

# What to do with the images of a label conflict (data.label_conflicts).
LABEL_CONFLICTS = ("drop", "keep", "refuse")


def label_conflicts(images: list[dict]) -> dict[str, list[dict]]:
    """Images by sha256, for each content found under more than one class folder."""
    by_content: dict[str, list[dict]] = {}
    for record in images:
        by_content.setdefault(record["sha256"], []).append(record)
    return {
        sha256: records
        for sha256, records in by_content.items()
        if len({r["class"] for r in records}) > 1
    }


def resolve_label_conflicts(root: Path, images: list[dict], policy: str):
    """(images to use, conflicting images left out, conflicting images kept), each conflict
    with its reason in `error`; refused as a UserError with policy `refuse`."""
    conflicts = label_conflicts(images)
    if not conflicts:
        return images, [], []
    examples = [" = ".join(r["path"] for r in records) for records in list(conflicts.values())[:3]]
    count = sum(len(records) for records in conflicts.values())
    if policy == "refuse":
        raise UserError(
            f"{count} images in {root} have the same content as an image of another class "
            f"(label conflicts), e.g. {'; '.join(examples)}. Remove the copy from the wrong "
            "class folder, or set data.label_conflicts=drop (leave them out) or "
            "data.label_conflicts=keep (train on both labels)."
        )
    noted = []
    for records in conflicts.values():
        for record in records:
            others = [r["path"] for r in records if r["class"] != record["class"]]
            action = "left out" if policy == "drop" else "kept with both labels"
            reason = (
                f"label conflict: same content (sha256 {record['sha256'][:12]}) as "
                f"{', '.join(others)}; {action} (data.label_conflicts={policy})"
            )
            noted.append({**record, "error": reason})
    log.warning(
        "%d images have the same content under two or more class folders, %s "
        "(data.label_conflicts=%s; listed in the ingest report), e.g. %s",
        count, "left out" if policy == "drop" else "kept", policy, "; ".join(examples),
    )  # fmt: skip
    if policy == "keep":
        return images, [], noted
    conflicting = {id(record) for records in conflicts.values() for record in records}
    return [r for r in images if id(r) not in conflicting], noted, []
