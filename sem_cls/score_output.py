"""The output folder of `python score.py`: a marker that says a score run wrote it, Parquet
shards each written whole or not at all, and a lock for the run writing it. A rerun reads which
files are scored there (path, size, modification time) and adds shards; nothing in the folder
that the project did not write is changed or removed.
"""

import json
import os
import tempfile
from pathlib import Path

from sem_cls.errors import UserError

# The marker of a score output folder: how a rerun knows a folder it may add shards to.
MARKER = ".sem_cls_score.json"
SHARD_GLOB = "part-*.parquet"
# Tells the last shard apart when the driver was killed while writing it: never read.
PARTIAL_SUFFIX = ".partial"
# What identifies a file already scored.
KEY_COLUMNS = ("path", "size", "mtime_ns")


class ScoreOutput:
    """The output folder: the marker, the shards, the lock. Only files the project named are
    written, and nothing already there is changed or removed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.marker = self.folder / MARKER
        # Each shard's (path, size, mtime_ns): a shard never changes once written, so each is
        # read once however often a run asks what is scored.
        self._keys: dict[Path, list[tuple]] = {}

    def check(self) -> None:
        """The folder is new, empty or an earlier score output; nothing is written."""
        folder = self.folder
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UserError(
                    f"output={folder} exists and is not a folder; it is left as it is. Give "
                    "another output=... folder."
                )
            if not self.marker.is_file() and any(folder.iterdir()):
                raise UserError(
                    f"output={folder} holds files that are not the output of an earlier score "
                    "run; they are left as they are. Give a new or empty output=... folder."
                )

    def open(self, description: dict):
        """Check the folder (check) and lock it for this run, marked as a score output."""
        self.check()
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock, Timeout

        lock = FileLock(folder / ".sem_cls_score.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(
                f"output={folder} is being written by another score run right now. Wait for "
                "it to finish, or give another output=... folder."
            ) from None
        if not self.marker.exists():
            self.marker.write_text(json.dumps(description, indent=2) + "\n")
        return lock

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(SHARD_GLOB))

    def scored(self) -> set[tuple[str, int, int]]:
        """(path, size, mtime_ns) of every file in a complete shard."""
        import pyarrow.parquet as pq

        keys = set()
        for shard in self.shards():
            if shard not in self._keys:
                self._keys[shard] = _keys(pq.read_table(shard, columns=list(KEY_COLUMNS)))
            keys.update(self._keys[shard])
        return keys

    def write_shard(self, table, name: str) -> Path:
        """A shard written whole or not at all: under a name no reader takes, then renamed."""
        import pyarrow.parquet as pq

        path = self.folder / name
        if path.exists():  # names are the run's own (time and a random part): never replaced
            raise FileExistsError(f"{path} exists already; it is left as it is.")
        descriptor, partial = tempfile.mkstemp(
            dir=self.folder, prefix=f".{name}.", suffix=PARTIAL_SUFFIX
        )
        os.close(descriptor)
        try:
            pq.write_table(table, partial)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        self._keys[path] = _keys(table)
        return path

    def read(self):
        """Every row scored into this folder so far, as a pandas DataFrame."""
        import pandas as pd
        import pyarrow.parquet as pq

        shards = self.shards()
        if not shards:
            return pd.DataFrame()
        return pd.concat([pq.read_table(s).to_pandas() for s in shards], ignore_index=True)


def shard_schema(top_k: int):
    """Every shard's columns, fixed, so shards of any run read as one table."""
    import pyarrow as pa

    fields = [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("predicted_class", pa.string()),
        ("confidence", pa.float64()),
        ("novelty", pa.float64()),
    ]
    for rank in range(1, top_k + 1):
        fields += [(f"top{rank}_class", pa.string()), (f"top{rank}_prob", pa.float64())]
    fields += [("error", pa.string()), ("model", pa.string()), ("engine", pa.string())]
    fields += [("node", pa.string())]
    return pa.schema(fields)


def _keys(table) -> list[tuple]:
    """(path, size, mtime_ns) of each row of a shard's table."""
    return list(zip(*(table[name].to_pylist() for name in KEY_COLUMNS), strict=True))
