"""train.py end to end with each feature engine: frozen InceptionV3, cold feature cache.

    python bench/engines_e2e.py --data /tmp/sem2000 [--images-per-class 200] [--runs 1]

Generates the 1024x768 JPEG set into --data unless that folder exists (then used as it is).
A first openvino run fills the ingest and converted-model caches; then the engines take turns
(interleaved, --runs each), each with the feature cache emptied before it, so every timed run
extracts every image. Random weights (model.pretrained=false): they do not change the speed.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sem_cls.data.synthetic import generate_dataset  # noqa: E402

ENGINES = ("torch", "openvino")


def train(data: Path, work: Path, engine: str, extra: list[str]) -> float:
    """Seconds of one `python train.py` run."""
    command = [
        sys.executable, "train.py", "model=inception_v3", "model.pretrained=false",
        f"data.data_dir={data}", "data.synthetic=null", f"data.engine={engine}",
        f"paths.cache_dir={work / 'cache'}", f"paths.output_dir={work / 'out' / engine}",
        f"paths.log_dir={work / 'logs'}", "logger=none", "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images-per-class", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = parser.parse_args()

    if not args.data.exists():  # an existing <Class>/ folder is used as it is
        generate_dataset(args.data, images_per_class=args.images_per_class)
    images = sum(1 for p in args.data.rglob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seconds = train(args.data, work, "openvino", args.overrides)
        print(f"first run (ingest, conversion, extraction): {seconds:.0f} s", flush=True)
        times = {engine: [] for engine in ENGINES}
        for _ in range(args.runs):
            for engine in ENGINES:
                shutil.rmtree(work / "cache" / "features", ignore_errors=True)
                times[engine].append(train(args.data, work, engine, args.overrides))
                print(f"{engine}: {times[engine][-1]:.1f} s", flush=True)
    best = {engine: min(values) for engine, values in times.items()}
    print(f"\ntrain.py, {images} JPEGs of 1024x768, frozen InceptionV3, cold feature cache")
    for engine in ENGINES:
        print(f"{engine:9} {best[engine]:7.1f} s  {images / best[engine]:6.1f} img/s")
    print(f"openvino speed-up: {best['torch'] / best['openvino']:.2f}x")


if __name__ == "__main__":
    main()
