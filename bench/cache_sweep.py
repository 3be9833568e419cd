"""Feature cache vs recomputing the frozen backbone: time per epoch and a 12-trial head sweep.

    python bench/cache_sweep.py [--model efficientnet_lite0] [--epochs 3]

Runs train.py as a user would (experiment=demo: 400 generated images, 280 for training), with
a cold cache for the cached runs, so their figures include one extraction.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning import Callback

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["model.optimizer.lr=1e-4,3e-4,1e-3,3e-3", "data.batch_size=16,32,64"]  # 12 trials


class EpochTimer(Callback):
    """Writes the wall time of each training epoch (validation included) to a JSON file."""

    def __init__(self, out: str):
        self.out, self.times = Path(out), []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self.start)
        self.out.write_text(json.dumps(self.times))


def train(work: Path, *overrides: str, multirun: bool = False, cache: Path | None = None) -> float:
    """Wall seconds of one train.py call, its outputs under `work` (feature cache: `cache`)."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *(["-m"] if multirun else []),
        "experiment=demo",
        f"paths.mlruns_dir={work / 'mlruns'}",
        f"paths.log_dir={work / 'logs'}",
        f"paths.cache_dir={cache or work / 'cache'}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    common = [f"model={args.model}", f"trainer.max_epochs={args.epochs}"]

    epochs, sweeps = {}, {}
    for cache in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            work, timings = Path(tmp), Path(tmp) / "epochs.json"
            timer = [
                "+callbacks.epoch_timer._target_=bench.cache_sweep.EpochTimer",
                f"+callbacks.epoch_timer.out={timings}",
            ]
            train(work, *common, f"data.cache_features={cache}", *timer)
            epochs[cache] = json.loads(timings.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            sweeps[cache] = train(
                Path(tmp), *common, f"data.cache_features={cache}", *SWEEP, multirun=True
            )

    cached_epoch = sum(epochs[True][1:]) / len(epochs[True][1:])
    recompute_epoch = sum(epochs[False]) / len(epochs[False])
    print(f"\nmodel={args.model}, experiment=demo, {args.epochs} epochs; seconds")
    print(f"{'':34} {'cached':>9} {'recompute':>10} {'speed-up':>9}")
    print(
        f"{'epoch after the first (train+val)':34} {cached_epoch:>9.3f} {recompute_epoch:>10.2f}"
        f" {recompute_epoch / cached_epoch:>8.0f}x"
    )
    print(f"{'first epoch':34} {epochs[True][0]:>9.3f} {epochs[False][0]:>10.2f}")
    print(
        f"{'12-trial sweep, wall':34} {sweeps[True]:>9.1f} {sweeps[False]:>10.1f}"
        f" {sweeps[False] / sweeps[True]:>8.1f}x"
    )


if __name__ == "__main__":
    main()
