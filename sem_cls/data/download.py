"""Download a published variant of the NFFA-Europe SEM dataset into <data_dir>/<variant>/<Class>/.

Each class is one tar in a B2SHARE record (https://b2share.eudat.eu). A tar is fetched into
`<Class>.tar.part` (an interruption is resumed with an HTTP Range request), checked against the
checksum in the record's metadata, then unpacked into a hidden temporary folder that is renamed
to `<Class>/` only when complete. A class folder that exists is skipped, so running it again
costs only what is missing. It does not check the images: ingest does that when training reads
the folder.

python -m sem_cls.data.download                          # 21,169 images into data/nffa/
python -m sem_cls.data.download download=nffa_majority   # or nffa_2017; see conf/download/
"""

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests
import urllib3
from tqdm.auto import tqdm

from sem_cls.data.archives import extract_class, stale_partials
from sem_cls.errors import UserError

log = logging.getLogger(__name__)

B2SHARE = "https://b2share.eudat.eu"
ARCHIVE_DIR = ".download"  # tars while they arrive, inside the target folder and hidden too
# Client errors that will not change on a retry; 408 and 429 may.
FINAL_HTTP_ERRORS = set(range(400, 500)) - {408, 429}


@dataclass(frozen=True)
class RecordFile:
    """A file of a B2SHARE record: where to fetch it and what it must be."""

    key: str
    url: str
    size: int | None = None
    checksum: str | None = None  # "md5:<hex>" as B2SHARE gives it; None: not given


class DownloadInterrupted(requests.ConnectionError):
    """The transfer stopped before the end; what arrived is kept and the next attempt resumes."""


def class_name(archive_name: str) -> str:
    """`Biological.tar` -> `Biological`."""
    return archive_name.split(".", 1)[0]


def record_files(record: dict, base_url: str, record_id: str) -> dict[str, RecordFile]:
    """The files a record's JSON lists, by key.

    B2SHARE has answered in two shapes: B2SHARE 2 (Invenio 3) a list under `files` whose
    entries name a `bucket`, the InvenioRDM-based B2SHARE `files.entries` with a `links.content`
    download link. A record's files listing (`links.files`) holds either kind of entry, under
    `contents` or `entries`.
    """
    entries = record.get("files")
    if isinstance(entries, dict):
        entries = entries.get("entries")
    if entries is None:
        entries = record.get("entries") or record.get("contents")
    if isinstance(entries, dict):
        entries = list(entries.values())
    found = {}
    for entry in entries if isinstance(entries, list) else []:
        key = entry.get("key") if isinstance(entry, dict) else None
        if not key:
            continue
        links = entry.get("links") or {}
        if links.get("content"):
            url = links["content"]
        elif entry.get("bucket"):
            url = f"{base_url}/api/files/{entry['bucket']}/{quote(key)}"
        elif "/api/files/" in links.get("self", ""):  # a bucket listing's entry links to the bytes
            url = links["self"]
        else:  # InvenioRDM's own `self` is the file's metadata, not its content
            url = f"{base_url}/api/records/{record_id}/files/{quote(key)}/content"
        found[key] = RecordFile(key, url, entry.get("size"), entry.get("checksum") or None)
    return found


def _get_json(session: requests.Session, url: str, timeout_s: float, hint: str) -> dict:
    try:
        response = session.get(url, timeout=timeout_s)
    except requests.RequestException as err:
        raise UserError(
            f"Could not reach {url} ({err}). Check the connection and run the same command again."
        ) from err
    if response.status_code in (404, 410):
        raise UserError(f"{url} answered {response.status_code}: no such record. {hint}")
    try:
        response.raise_for_status()
        return response.json()
    except (requests.RequestException, ValueError) as err:
        raise UserError(
            f"{url} did not return the record's metadata ({err}). Run the same command again "
            f"later; if it keeps failing: {hint}"
        ) from err


def fetch_record(
    session: requests.Session,
    base_url: str,
    record_id: str,
    wanted: Sequence[str],
    timeout_s: float = 60,
    doi: str | None = None,
) -> dict[str, RecordFile]:
    """The record's files (URL, size, checksum) by key; a UserError if one of `wanted` is not."""
    landing = f"https://doi.org/{doi}" if doi else f"{base_url}/records/{record_id}"
    hint = (
        f"If the record has moved, open {landing} to find its current id and pass "
        "download.record_id=<that id>."
    )
    record = _get_json(session, f"{base_url}/api/records/{record_id}", timeout_s, hint)
    files = record_files(record, base_url, record_id)
    listing = (record.get("links") or {}).get("files")
    if not set(wanted) <= files.keys() and isinstance(listing, str):
        # Older records give only a link to their file bucket; some list files only there.
        files |= record_files(_get_json(session, listing, timeout_s, hint), base_url, record_id)
    missing = [key for key in wanted if key not in files]
    if missing:
        raise UserError(
            f"Record {record_id} at {base_url} lists no {', '.join(missing)}; it lists "
            f"{', '.join(sorted(files)) or 'no files'}. Fix download.files, or {hint}"
        )
    return files


def _fetch_once(
    session: requests.Session, remote: RecordFile, part: Path, timeout_s: float, chunk_bytes: int
) -> None:
    """One request for what `part` still lacks; raises requests errors, DownloadInterrupted."""
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have > remote.size:  # not a prefix of this file
        part.unlink()
        have = 0
    if remote.size is not None and have == remote.size:
        return
    # Byte ranges of the file as stored: a compressed transfer would shift them.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    with session.get(remote.url, headers=headers, stream=True, timeout=timeout_s) as response:
        if have and response.status_code == 416:  # nothing after `have`: the part is whole
            return
        response.raise_for_status()
        if response.status_code == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start[1]) != have:
                part.unlink()
                raise DownloadInterrupted(
                    f"the server resumed at {start[1] if start else '?'} instead of byte {have}"
                )
            mode = "ab"
        else:  # 200: the server ignored the Range header and sends everything again
            have = 0
            mode = "wb"
        length = response.headers.get("Content-Length")
        total = remote.size or (have + int(length) if length else None)
        bar = tqdm(
            total=total, initial=have, desc=remote.key, unit="B", unit_scale=True, unit_divisor=1024
        )
        with part.open(mode) as f, bar:
            while True:
                try:
                    # read1 returns what has arrived: iter_content would drop the bytes of an
                    # unfinished chunk when the connection breaks, and resuming needs them.
                    chunk = response.raw.read1(chunk_bytes)
                except (urllib3.exceptions.HTTPError, OSError) as err:
                    reason = err.args[0] if err.args and isinstance(err.args[0], str) else err
                    raise DownloadInterrupted(reason) from err
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if remote.size is not None and size < remote.size:
        raise DownloadInterrupted(f"the connection closed after {size:,} of {remote.size:,} bytes")


def verify(path: Path, remote: RecordFile) -> None:
    """Size and checksum as the record gives them; a mismatch deletes `path` and says so."""
    again = "It was deleted; run the same command again to download it anew."
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        path.unlink()
        raise UserError(
            f"{remote.key} from {remote.url} has {size:,} bytes, the record says {remote.size:,}. "
            + again
        )
    if not remote.checksum:
        log.warning("The record gives no checksum for %s: only its size was checked.", remote.key)
        return
    algorithm, _, expected = remote.checksum.rpartition(":")
    algorithm = algorithm.lower() or {32: "md5", 64: "sha256"}.get(len(expected), "")
    if algorithm not in hashlib.algorithms_available:
        log.warning("Checksum %r of %s: unknown algorithm, not checked.", remote.checksum, path)
        return
    with path.open("rb") as f:
        actual = hashlib.file_digest(f, algorithm).hexdigest()
    if actual != expected.lower():
        path.unlink()
        raise UserError(
            f"{remote.key} from {remote.url} is corrupt: its {algorithm} is {actual}, the record "
            f"says {expected.lower()}. " + again
        )


def download_file(
    session: requests.Session,
    remote: RecordFile,
    archive: Path,
    *,
    timeout_s: float = 60,
    retries: int = 3,
    retry_wait_s: float = 5,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """`remote` saved as `archive`, verified; `archive` never exists incomplete.

    The bytes arrive in `<archive>.part`; a dropped connection is resumed from where it stopped
    (up to `retries` times here, and by the next run after that).
    """
    part = archive.with_name(archive.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(session, remote, part, timeout_s, chunk_bytes)
            break
        except requests.RequestException as err:
            status = err.response.status_code if err.response is not None else None
            if attempt == retries or status in FINAL_HTTP_ERRORS:
                have = part.stat().st_size if part.exists() else 0
                raise UserError(
                    f"Download of {remote.url} failed: {err}. {part} keeps the {have:,} bytes "
                    "that arrived; run the same command again to resume from there."
                ) from err
            log.warning(
                "%s: %s; resuming in %g s (retry %d of %d)",
                remote.key, err, retry_wait_s, attempt + 1, retries,
            )  # fmt: skip
            time.sleep(retry_wait_s)
    verify(part, remote)
    os.replace(part, archive)
    return archive


def _check_free_space(target_dir: Path, remote: list[RecordFile], archive_dir: Path) -> None:
    """Each tar is deleted once unpacked: the peak is all classes unpacked plus the largest tar."""
    sizes = [f.size for f in remote]
    if not sizes or None in sizes:
        return
    arrived = sum(p.stat().st_size for p in archive_dir.glob("*") if p.is_file())
    need = sum(sizes) + max(sizes) - arrived
    free = shutil.disk_usage(target_dir).free
    if free < need:
        raise UserError(
            f"{target_dir} needs about {need / 1e9:.1f} GB free for the missing classes and has "
            f"{free / 1e9:.1f} GB. Free some space, or download elsewhere with "
            "target_dir=/path/with/space (then train with data.data_dir=that path)."
        )


def download_dataset(
    record_id: str,
    files: Sequence[str],
    target_dir: Path,
    *,
    base_url: str = B2SHARE,
    doi: str | None = None,
    timeout_s: float = 60,
    retries: int = 3,
    retry_wait_s: float = 5,
    chunk_bytes: int = 1 << 20,
) -> dict[str, Path]:
    """Every class tar of `files` from the record unpacked to `target_dir/<Class>/`, by class."""
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    class_dirs = {name: target_dir / class_name(name) for name in files}
    for stale in stale_partials(target_dir, [d.name for d in class_dirs.values()]):
        shutil.rmtree(stale, ignore_errors=True)
    missing = [name for name, class_dir in class_dirs.items() if not class_dir.is_dir()]
    for name, class_dir in class_dirs.items():
        if name not in missing:
            log.info("%s: %s is there, skipped", name, class_dir)
    if not missing:
        return {class_name(name): path for name, path in class_dirs.items()}

    archive_dir = target_dir / ARCHIVE_DIR
    with requests.Session() as session:
        session.headers["User-Agent"] = "sem-cls dataset download"
        remote = fetch_record(session, base_url, record_id, missing, timeout_s, doi)
        archive_dir.mkdir(exist_ok=True)
        _check_free_space(target_dir, [remote[name] for name in missing], archive_dir)
        for name in missing:
            archive = archive_dir / name
            if not archive.is_file():  # a complete one was verified before it got this name
                download_file(
                    session, remote[name], archive,
                    timeout_s=timeout_s, retries=retries, retry_wait_s=retry_wait_s,
                    chunk_bytes=chunk_bytes,
                )  # fmt: skip
            count = extract_class(archive, class_dirs[name])
            log.info("%s: %d files in %s", name, count, class_dirs[name])
            archive.unlink()
    if not any(archive_dir.iterdir()):
        archive_dir.rmdir()
    return {class_name(name): path for name, path in class_dirs.items()}


def download_from_config(cfg) -> dict[str, Path]:
    """`download_dataset` with the composed `conf/download.yaml`."""
    variant = cfg.download
    return download_dataset(
        variant.record_id,
        list(variant.files),
        Path(cfg.target_dir),
        base_url=variant.base_url,
        doi=variant.get("doi"),
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        retry_wait_s=cfg.retry_wait_s,
    )


def main() -> None:
    import hydra

    from sem_cls.errors import exits_on_user_error, run_command

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="download")
    @exits_on_user_error
    def run(cfg) -> None:
        class_dirs = download_from_config(cfg)
        count = sum(1 for d in class_dirs.values() for p in d.rglob("*") if p.is_file())
        target = Path(cfg.target_dir)
        images = cfg.download.get("images")
        described = f" (the record describes {images:,} images)" if images else ""
        default = Path(cfg.paths.data_dir) / "nffa"  # conf/data/nffa.yaml
        train = "python train.py" + ("" if target == default else f" data.data_dir={target}")
        print(
            f"\n{cfg.download.get('title', cfg.download.name)}: {count:,} files in "
            f"{len(class_dirs)} class folders in {target}{described}.\nTrain on them: {train}"
        )

    run_command(run)


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[2]))
    main()
