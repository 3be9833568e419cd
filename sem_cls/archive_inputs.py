"""What an archive run scores: local folders, globs, file lists and files, and objects of a store
that pyarrow.fs reaches (s3://bucket/prefix, gs://...), each with the path or URI, size and
modification time that tell a rerun it is already scored."""

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from sem_cls.data.images import is_image_file, walk_files
from sem_cls.errors import UserError

# scheme://...: an object store's URI, handed to pyarrow.fs, not a local path.
STORE_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Query options that may carry credentials: left out of every message, log and MLflow param.
SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


@dataclass(frozen=True)
class InputFile:
    """One file or object to score, and what identifies it: path (absolute, or the object's
    scheme://bucket/key URI), size and mtime in ns."""

    path: str
    size: int
    mtime_ns: int
    error: str = ""  # why it could not be listed (a symlink loop, a broken link)
    store: int = -1  # its ObjectStore's index in list_inputs' stores; -1: a local file

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class ObjectStore:
    """A store that pyarrow.fs reaches. The filesystem pickles with the options of its URI only:
    each Ray node finds credentials as the driver does (AWS_* variables, ~/.aws)."""

    filesystem: object  # a pyarrow.fs.FileSystem
    scheme: str

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    def read(self, uri: str) -> bytes:
        with self.filesystem.open_input_stream(uri.removeprefix(f"{self.scheme}://")) as stream:
            return stream.read()


def redacted(item) -> str:
    """`item` as it may be shown: a URI without user info (key:secret@) and without the query
    options named like a key, secret or token."""
    item = str(item)
    if not STORE_URI.match(item):
        return item
    parts = urlsplit(item)
    options = [o for o in parts.query.split("&") if o and not SECRET_OPTION.search(o.split("=")[0])]
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query="&".join(options)))


def _scrubbed(message: str, uri: str) -> str:
    """`message` (a store's error about `uri`) with the URI's credentials, if any, hidden."""
    parts = urlsplit(uri)
    options = [o.partition("=") for o in parts.query.split("&")]
    secrets = [parts.username, parts.password]
    secrets += [value for name, _, value in options if SECRET_OPTION.search(name)]
    for secret in filter(None, secrets):
        message = message.replace(secret, "***")
    return message


def redacted_inputs(inputs) -> str | list[str]:
    """`inputs` (an item or a list) as they may be recorded."""
    if isinstance(inputs, str | Path):
        return redacted(inputs)
    return [redacted(item) for item in inputs]


def list_objects(uri: str, index: int) -> tuple[ObjectStore, list[InputFile], list[str]]:
    """The store of `uri`, its image objects (an object, or every object under a prefix) and
    the URIs of the others. A store that does not answer, a bucket or prefix that does not
    exist stop the run naming the URI."""
    import pyarrow.fs as pafs

    shown = redacted(uri)
    try:
        filesystem, base = pafs.FileSystem.from_uri(uri)
        store = ObjectStore(filesystem, urlsplit(uri).scheme)
        found = filesystem.get_file_info(base)
        if found.type == pafs.FileType.Directory:
            found = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
        elif found.type == pafs.FileType.File:
            found = [found]
        else:
            bucket = base.split("/")[0]
            missing = filesystem.get_file_info(bucket).type == pafs.FileType.NotFound
            raise UserError(
                f"inputs: {shown}: "
                + (f"the bucket {bucket} does not exist" if missing else "no object there")
                + ". Check the bucket, the prefix and the store's address."
            )
    except (OSError, ValueError) as err:  # ValueError: pyarrow's ArrowInvalid, a URI it refuses
        raise UserError(
            f"inputs: {shown} cannot be listed: {_scrubbed(str(err).splitlines()[0], uri)}. "
            "Check the URI, the store's address (endpoint_override=host:port) and the "
            "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws)."
        ) from None
    objects, left_out = [], []
    for info in found:
        if info.type != pafs.FileType.File:
            continue
        if is_image_file(PurePosixPath(info.path)):
            mtime = info.mtime_ns if info.mtime_ns is not None else -1
            objects.append(InputFile(store.uri(info.path), info.size, mtime, store=index))
        else:
            left_out.append(store.uri(info.path))
    return store, objects, left_out


def list_inputs(inputs) -> tuple[list[InputFile], list, list[ObjectStore]]:
    """The image files of `inputs`: folders (walked as ingest and predict walk them), globs
    (`/archive/**/*.tif`), files named one by one, a .txt file list (one path a line), or object
    store URIs (s3://bucket/prefix); the files and objects left out as no image by their suffix;
    and the stores the objects are read from."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    found: list[tuple[Path, str]] = []
    files, left_out, stores = [], [], []
    for item in map(str, items):
        path = Path(item)
        if STORE_URI.match(item):
            store, objects, others = list_objects(item, len(stores))
            stores.append(store)
            files += objects
            left_out += others
        elif glob.has_magic(item):
            found += [(Path(p), "") for p in sorted(glob.glob(item, recursive=True))]
        elif path.is_dir():
            for file, error in walk_files(path):
                if error or is_image_file(file):
                    found.append((file, error))
                else:
                    left_out.append(file)
        elif path.is_file() and path.suffix == ".txt":
            lines = path.read_text().splitlines()
            found += [(Path(line.strip()), "") for line in lines if line.strip()]
        elif path.is_file():
            found.append((path, ""))
        else:
            raise UserError(f"inputs: {item} is neither a folder, a file nor a glob that matches.")
    for path, error in found:
        absolute = os.path.abspath(path)
        try:
            info = os.stat(absolute)
            files.append(InputFile(absolute, info.st_size, info.st_mtime_ns, error))
        except OSError as err:
            files.append(InputFile(absolute, -1, -1, error or f"cannot be read: {err.strerror}"))
    if not files:
        shown = [redacted(item) for item in items]
        raise UserError(f"inputs={shown} holds no image files (.jpg .png .tif .bmp).")
    return files, left_out, stores


def read_inputs(paths, store_indexes, stores: list[ObjectStore]) -> tuple[list, list[str]]:
    """What ImagesToClassify takes for each listed file: its local path, or the object's bytes
    read from its store; and why an object could not be read ("" where it was)."""
    items, errors = [], []
    for path, index in zip(paths, store_indexes, strict=True):
        if index < 0:
            items.append(Path(path))
            errors.append("")
            continue
        try:
            items.append(stores[index].read(path))
            errors.append("")
        except OSError as err:  # gone since the listing, access denied, the store unreachable
            items.append(b"")
            errors.append(f"could not be read: {str(err).splitlines()[0]}")
    return items, errors
