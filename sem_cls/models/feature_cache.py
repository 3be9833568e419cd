"""FeatureCache: a frozen backbone's pooled features, computed once per image and kept on disk.

A frozen backbone maps an image to the same features every epoch, every run and every trial
of a sweep over the head, so they are computed once. An entry is keyed by everything that
changes them (architecture, every weight, preprocessing, precision, the images' content), so a
stale entry is never read. Entries are .npy files read memory-mapped, so memory does not grow
with the dataset, and written under a temporary name then renamed, so an interrupted
extraction leaves nothing that looks complete. Under DDP each rank extracts every
world_size-th image into a shard of its own, and rank 0 merges the shards into the entry.
"""

import hashlib
import json
import logging
import os
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the image content, whatever its name or place."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer, by name."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def extract_features(
    engine, dataset: Dataset, batch_size: int, num_workers: int, out: np.ndarray
) -> None:
    """Run a feature `engine` (sem_cls.models.engines) over `dataset` in order, writing
    (N, num_features) rows into `out`."""
    device = engine.device
    # A private generator: extracting must not shift the global RNG, or the shuffling of the
    # head's training would depend on whether the cache was warm.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
    )
    row = 0
    for images, _ in tqdm(loader, desc="backbone features", unit="batch"):
        features = engine(images)  # (B, 3, H, W) -> (B, num_features)
        out[row : row + len(features)] = features.cpu().numpy()
        row += len(features)


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
            "architecture": backbone.pretrained_cfg.get("architecture", type(backbone).__name__),
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
        distributed = strategy is not None and strategy.world_size > 1
        # Rank 0 decides hit or miss for all, so no rank waits at a barrier the others skip.
        hit = strategy.broadcast(entry.is_file()) if distributed else entry.is_file()
        if hit:
            log.info("Feature cache hit: %s", entry)
            return np.load(entry, mmap_mode="r")

        log.info("Feature cache miss: extracting %d images into %s", len(dataset), entry)
        entry_dir.mkdir(parents=True, exist_ok=True)
        if distributed:
            args = (engine, dataset, batch_size, num_workers)
            return self._extract_sharded(entry, *args, strategy)
        partial = entry.with_suffix(f".partial-{os.getpid()}.npy")
        try:
            out = np.lib.format.open_memmap(
                partial, mode="w+", dtype=np.float32, shape=(len(dataset), engine.num_features)
            )
            extract_features(engine, dataset, batch_size, num_workers, out)
            out.flush()
            del out
            os.replace(partial, entry)  # atomic: readers see no entry or a complete one
        finally:
            partial.unlink(missing_ok=True)
        return np.load(entry, mmap_mode="r")

    @staticmethod
    def _extract_sharded(entry, engine, dataset, batch_size, num_workers, strategy):
        """Rank r extracts rows r, r + world_size, ... into its own shard file; after a barrier
        rank 0 interleaves the shards into the entry (written under a temporary name and
        renamed, as alone), and after another all ranks read it. Shards and entry must be on a
        filesystem that every rank sees: with several nodes, a shared cache_dir."""
        rank, world = strategy.global_rank, strategy.world_size
        # Named after rank 0's process, so two jobs extracting the same entry never share a file.
        job = strategy.broadcast(os.getpid())
        shards = [entry.with_suffix(f".partial-{job}-{r}-of-{world}.npy") for r in range(world)]
        shard, partial = shards[rank], entry.with_suffix(f".partial-{job}.npy")
        num_features = engine.num_features
        rows = range(rank, len(dataset), world)
        try:
            out = np.lib.format.open_memmap(
                shard, mode="w+", dtype=np.float32, shape=(len(rows), num_features)
            )
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
                merged = np.lib.format.open_memmap(
                    partial, mode="w+", dtype=np.float32, shape=(len(dataset), num_features)
                )
                for r, path in enumerate(shards):
                    merged[r::world] = np.load(path, mmap_mode="r")  # rows r, r + world, ...
                merged.flush()
                del merged
                os.replace(partial, entry)  # atomic: readers see no entry or a complete one
            strategy.barrier("feature cache entry merged")
        finally:
            shard.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
        return np.load(entry, mmap_mode="r")
