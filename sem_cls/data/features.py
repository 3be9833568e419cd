"""FeatureCache: a frozen backbone's pooled features, computed once per image and kept on disk.

A frozen backbone maps an image to the same features every epoch, every run and every trial
of a sweep over the head, so they are computed once. An entry is keyed by everything that
changes them (architecture, every weight, preprocessing, precision, the images' content), so a
stale entry is never read. Entries are .npy files read memory-mapped, so memory does not grow
with the dataset, and written under a temporary name then renamed, so an interrupted
extraction leaves nothing that looks complete. Each entry has a sidecar `<key>.json` with the
sha256, shape and dtype of its .npy, checked on every read: an entry that does not match is
discarded with a warning and extracted again, never trained on. Under DDP each rank extracts
every world_size-th image into a shard of its own, and rank 0 merges the shards into the entry.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from sem_cls.data.workers import worker_init_fn
from sem_cls.errors import OutOfSpace, UserError, is_out_of_space

log = logging.getLogger(__name__)


def architecture(backbone: nn.Module) -> str:
    """The backbone's timm architecture name (its class name for a module timm did not build):
    with weights_digest, what identifies it in the feature and conversion caches."""
    return backbone.pretrained_cfg.get("architecture", type(backbone).__name__)


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer, by name."""
    return state_digest(module.state_dict())


def state_digest(state: dict) -> str:
    """weights_digest of a state dict (a checkpoint's, without building its module)."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def extract_features(
    engine, dataset: Dataset, batch_size: int, num_workers: int, out: np.ndarray
) -> None:
    """Run a feature `engine` (sem_cls.models.engines) over `dataset` ({"image": ...} items) in
    order, writing (N, num_features) rows into `out`."""
    device = engine.device
    # A private generator: extracting must not shift the global RNG, or the shuffling of the
    # head's training would depend on whether the cache was warm.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init_fn,  # workers end with this process, even when it is killed
    )
    row = 0
    for batch in tqdm(loader, desc="backbone features", unit="batch"):
        features = engine(batch["image"])  # (B, H, W, 3) uint8 -> (B, num_features)
        out[row : row + len(features)] = features.cpu().numpy()
        row += len(features)


# Temporary files of an extraction: `<key>.partial-<pid>@<host>[.shard-<r>-of-<n>].npy`, named
# after the process (rank 0's under DDP) that writes them, so a stale one can be recognised.
_PARTIAL = re.compile(
    r"^[0-9a-f]{24}\.partial-(?P<pid>\d+)@(?P<host>[^/@]+?)(\.shard-\d+-of-\d+)?\.npy$"
)


def _partial_name(entry: Path, pid: int, host: str, shard: str = "") -> Path:
    return entry.with_name(f"{entry.stem}.partial-{pid}@{host}{shard}.npy")


def _sidecar(entry: Path) -> Path:
    return entry.with_suffix(".json")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # ~0.2 s for 170 MB


def _commit(partial: Path, entry: Path) -> None:
    """Rename a complete `partial` into place as `entry`, its sidecar first: a kill between the
    two renames leaves a sidecar without entry (a miss), never an entry that verifies."""
    matrix = np.load(partial, mmap_mode="r", allow_pickle=False)
    recorded = {"sha256": _sha256(partial), "shape": list(matrix.shape), "dtype": matrix.dtype.str}
    del matrix
    partial.with_suffix(".json").write_text(json.dumps(recorded))
    os.replace(partial.with_suffix(".json"), _sidecar(entry))
    os.replace(partial, entry)  # atomic: readers see no entry or a complete one


def _open_allocated(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A new float32 .npy of `shape` at `path`, memory-mapped, with its disk space allocated at
    once: a mapped file is sparse, and writing a page the disk has no room for kills the process
    with SIGBUS, without a message, after all the work of extracting up to it."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    size = path.stat().st_size
    with path.open("r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that can
                raise
            if shutil.disk_usage(path.parent).free < size:  # only check
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
    return out


def _problem(entry: Path, shape: tuple[int, int]) -> str:
    """Why the entry at `entry` cannot be trusted, or "" when it matches its sidecar."""
    try:
        recorded = json.loads(_sidecar(entry).read_text())
        sha256, recorded_shape, dtype = recorded["sha256"], recorded["shape"], recorded["dtype"]
    except FileNotFoundError:
        return "it has no checksum file"
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"its checksum file is unreadable ({type(err).__name__})"
    try:
        if _sha256(entry) != sha256:
            return "its content does not match its checksum (changed or damaged since written)"
        matrix = np.load(entry, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is discarded, not fatal
        return f"it is not a readable feature matrix ({type(err).__name__}: {err})"
    found = (matrix.dtype.str, list(matrix.shape))
    if found != (dtype, recorded_shape) or found != (np.dtype(np.float32).str, list(shape)):
        return f"it holds {found[0]} {tuple(found[1])}, not float32 {shape}"
    return ""


def _unrepairable(path: Path, err: OSError) -> UserError:
    return UserError(
        f"The feature cache cannot be repaired at {path} ({type(err).__name__}: {err}). Remove "
        f"it (rm -r {path}) or give another data.cache_dir."
    )


def _discard(entry: Path, why: str) -> None:
    log.warning("Feature cache entry %s is discarded and extracted again: %s.", entry, why)
    try:
        entry.unlink(missing_ok=True)
        _sidecar(entry).unlink(missing_ok=True)
    except OSError as err:  # a directory where the entry should be, a read-only cache
        raise _unrepairable(entry, err) from None


def _remove_stale_partials(entry_dir: Path) -> None:
    """Delete partial files of extractions on this host whose process is gone (killed)."""
    host = socket.gethostname()
    for path in entry_dir.iterdir():
        match = _PARTIAL.match(path.name)
        if not match or match["host"] != host or not path.is_file():
            continue
        try:
            os.kill(int(match["pid"]), 0)
            continue  # still running: another extraction's file
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        log.info("Removing %s, left by a killed extraction.", path)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)


class FeatureCache:
    """Feature matrices under `cache_dir/<backbone key>/<images key>.npy`, one row per image."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        # A frozen backbone's weights do not change: hash them once per backbone, not per split
        # (about 100 MB of sha256 for InceptionV3).
        self._weights: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

    def weights(self, backbone: nn.Module) -> str:
        """The backbone's weights digest, computed once per backbone."""
        if backbone not in self._weights:
            self._weights[backbone] = weights_digest(backbone)
        return self._weights[backbone]

    def backbone_key(self, engine, preprocessing: dict) -> str:
        backbone = engine.backbone
        description = {
            "architecture": architecture(backbone),
            "weights": self.weights(backbone),
            "preprocessing": preprocessing,
            # Engines and precisions agree closely, not bit for bit.
            "engine": engine.name,
            "precision": engine.precision,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]

    def features(
        self,
        engine,
        preprocessing: dict,
        dataset: Dataset,
        image_digests: list[str],
        batch_size: int = 32,
        num_workers: int = 2,
        strategy=None,
    ) -> np.ndarray:
        """(N, num_features) features of `dataset`'s images by a feature `engine`
        (sem_cls.models.engines), memory-mapped; computed on a miss.

        With a distributed Lightning `strategy`, every rank must call this with the same
        arguments: the extraction is shared among them (see `_extract_sharded`).
        """
        images_key = hashlib.sha256("\n".join(image_digests).encode()).hexdigest()[:24]
        entry_dir = self.cache_dir / self.backbone_key(engine, preprocessing)
        entry = entry_dir / f"{images_key}.npy"
        shape = (len(dataset), engine.num_features)
        distributed = strategy is not None and strategy.world_size > 1
        # Rank 0 decides hit or miss for all, so no rank waits at a barrier the others skip.
        hit = self._verified(entry, shape) if not distributed or strategy.is_global_zero else None
        if distributed:
            hit = strategy.broadcast(hit)
        if hit:
            log.info("Feature cache hit: %s", entry)
            return np.load(entry, mmap_mode="r", allow_pickle=False)

        try:
            entry_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if is_out_of_space(err):
                raise OutOfSpace(entry, 4 * shape[0] * shape[1], "paths.cache_dir") from None
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _unrepairable(entry_dir, err) from None  # a file where a folder should be
        if not os.access(entry_dir, os.W_OK) and not distributed:
            # A shared read-only cache: its entries are read, what it lacks is not kept.
            log.warning(
                "Feature cache %s cannot be written (read-only or not yours): the features of "
                "%d images are extracted into memory for this run only. Set paths.cache_dir to "
                "a folder you can write to keep them.",
                self.cache_dir, len(dataset),
            )  # fmt: skip
            out = np.empty(shape, dtype=np.float32)
            extract_features(engine, dataset, batch_size, num_workers, out)
            return out
        log.info("Feature cache miss: extracting %d images into %s", len(dataset), entry)
        try:
            _remove_stale_partials(entry_dir)
        except OSError as err:  # no permission
            raise _unrepairable(entry_dir, err) from None
        if distributed:
            args = (engine, dataset, batch_size, num_workers)
            return self._extract_sharded(entry, *args, strategy)
        partial = _partial_name(entry, os.getpid(), socket.gethostname())
        try:
            out = _open_allocated(partial, shape)
            extract_features(engine, dataset, batch_size, num_workers, out)
            out.flush()
            del out
            _commit(partial, entry)
        except OSError as err:
            if is_out_of_space(err):
                raise OutOfSpace(entry, 4 * shape[0] * shape[1], "paths.cache_dir") from None
            raise
        finally:
            partial.unlink(missing_ok=True)
            partial.with_suffix(".json").unlink(missing_ok=True)
        return np.load(entry, mmap_mode="r", allow_pickle=False)

    @staticmethod
    def _verified(entry: Path, shape: tuple[int, int]) -> bool:
        """Whether `entry` is there and matches its checksum; one that does not is discarded."""
        if not entry.exists() and not entry.is_symlink():
            return False
        if entry.is_dir():
            raise _unrepairable(entry, IsADirectoryError("a folder where a cache file belongs"))
        problem = _problem(entry, shape)
        if problem:
            _discard(entry, problem)
        return not problem

    @staticmethod
    def _extract_sharded(entry, engine, dataset, batch_size, num_workers, strategy):
        """Rank r extracts rows r, r + world_size, ... into its own shard file; after a barrier
        rank 0 interleaves the shards into the entry (written under a temporary name and
        renamed, as alone), and after another all ranks read it. Shards and entry must be on a
        filesystem that every rank sees: with several nodes, a shared cache_dir."""
        rank, world = strategy.global_rank, strategy.world_size
        # Named after rank 0's process, so two jobs extracting the same entry never share a file.
        job, host = strategy.broadcast((os.getpid(), socket.gethostname()))
        shards = [_partial_name(entry, job, host, f".shard-{r}-of-{world}") for r in range(world)]
        shard, partial = shards[rank], _partial_name(entry, job, host)
        num_features = engine.num_features
        rows = range(rank, len(dataset), world)
        try:
            out = _open_allocated(shard, (len(rows), num_features))
            extract_features(engine, Subset(dataset, rows), batch_size, num_workers, out)
            out.flush()
            del out
            strategy.barrier("feature shards written")
            if strategy.is_global_zero:
                missing = [str(path) for path in shards if not path.is_file()]
                if missing:
                    raise RuntimeError(
                        f"Feature shards of other ranks are not visible here: {missing}. Put "
                        "data.cache_dir on a filesystem that every node shares."
                    )
                merged = _open_allocated(partial, (len(dataset), num_features))
                for r, path in enumerate(shards):
                    merged[r::world] = np.load(path, mmap_mode="r")  # rows r, r + world, ...
                merged.flush()
                del merged
                _commit(partial, entry)
            strategy.barrier("feature cache entry merged")
        except OSError as err:
            if is_out_of_space(err):
                needed = 4 * len(dataset) * num_features
                raise OutOfSpace(entry, needed, "paths.cache_dir") from None
            raise
        finally:
            shard.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            partial.with_suffix(".json").unlink(missing_ok=True)
        return np.load(entry, mmap_mode="r", allow_pickle=False)
