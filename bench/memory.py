"""Peak memory of training with the feature cache, for a small and a large generated set.

    python bench/memory.py [--images 2000 20000] [--size 256x192]

Runs train.py (experiment=demo, frozen EfficientNet-Lite0, feature cache on) on generated sets
and samples the process's resident memory: anonymous (heap: what grows if data were held in
memory) and file-backed (pages of the memory-mapped feature files, which the kernel can drop).
Small images keep generation quick; every image is still resized to 224 for the backbone.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sem_cls.data.synthetic import CLASSES, generate_dataset  # noqa: E402


def rss_mib(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of a process; zeros once it is gone."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        return tuple(int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile"))
    except (FileNotFoundError, ProcessLookupError, KeyError):  # exited, or a zombie
        return 0.0, 0.0


def peak_memory(data_dir: Path, work: Path) -> tuple[float, float, float]:
    """Peak anonymous and file-backed MiB of a training run, and its wall seconds."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=demo",
        f"data.data_dir={data_dir}",
        "data.synthetic=null",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        f"paths.mlruns_dir={work / 'mlruns'}",
        f"paths.log_dir={work / 'logs'}",
        f"paths.cache_dir={work / 'cache'}",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_file = 0.0
    while process.poll() is None:
        anon, file = rss_mib(process.pid)
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        time.sleep(0.2)
    if process.returncode:
        raise SystemExit(process.stderr.read().decode()[-3000:])
    return peak_anon, peak_file, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", default="256x192")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    rows = []
    for count in args.images:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "data"
            generate_dataset(data_dir, images_per_class=count // len(CLASSES), size=size)
            rows.append((count, *peak_memory(data_dir, Path(tmp))))

    print(f"\ntrain.py experiment=demo, 3 epochs, feature cache on, {args.size} JPEGs")
    header = ("images", "peak anon MiB", "peak file MiB", "features MiB", "wall s")
    print("{:>7} {:>14} {:>14} {:>13} {:>7}".format(*header))
    for count, anon, file, seconds in rows:
        features = count * 1280 * 4 / 2**20  # float32 rows of EfficientNet-Lite0's 1280 features
        print(f"{count:>7} {anon:>14.0f} {file:>14.0f} {features:>13.0f} {seconds:>7.0f}")


if __name__ == "__main__":
    main()
