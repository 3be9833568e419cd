"""Ingest speed: check, hash and bar-detect every file of a large generated folder.

    python bench/ingest.py [--images 20000] [--size 256x192] [--workers 2]

Generates the folder once (not timed; kept in --work for reruns), then times a cold ingest
(every file decoded and hashed, nothing cached), a warm one (the per-file cache answers), and
building the duplicate-aware split on top.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sem_cls.data.ingest import ingest  # noqa: E402
from sem_cls.data.manifest import SplitManifest  # noqa: E402
from sem_cls.data.synthetic import CLASSES, generate_dataset  # noqa: E402


def timed(task):
    start = time.perf_counter()
    result = task()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", default="256x192")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sem-ingest")
    args = parser.parse_args()
    size = tuple(int(side) for side in args.size.split("x"))
    per_class = args.images // len(CLASSES)
    data_dir = args.work / f"sem-{per_class * len(CLASSES)}-{args.size}"
    _, generate_s = timed(lambda: generate_dataset(data_dir, per_class, size=size))
    print(f"{per_class * len(CLASSES):,} images of {args.size} in {data_dir} ({generate_s:.0f} s)")

    cache_dir = args.work / f"cache-{time.time_ns()}"
    checks = cache_dir / "ingest"  # where the data module keeps them
    result, cold_s = timed(lambda: ingest(data_dir, checks, workers=args.workers))
    _, warm_s = timed(lambda: ingest(data_dir, checks, workers=args.workers, progress=False))

    def split():
        ingested = ingest(data_dir, checks, workers=args.workers, progress=False)
        manifest = SplitManifest.build(ingested)
        manifest.fingerprint()
        return manifest

    manifest, split_s = timed(split)
    count = len(result.images)
    print(f"cold ingest: {cold_s:.1f} s, {count / cold_s:.0f} images/s ({args.workers} workers)")
    print(f"warm ingest (cached checks): {warm_s:.2f} s")
    groups = len({row["group"] for row in manifest.rows})
    print(f"warm ingest + duplicate groups + split + fingerprint: {split_s:.2f} s")
    print(f"{groups:,} duplicate groups among {count:,} images")


if __name__ == "__main__":
    main()
