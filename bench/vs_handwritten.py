"""train.py's default against the PyTorch loops people write by hand, on the same images in one
run: a small experiment as researchers iterate (frozen InceptionV3, a linear head, 5 epochs,
validation every epoch, a test at the end, no tracking).

    python bench/vs_handwritten.py --data /tmp/sem200 [--images-per-class 20] [--runs 1]

Generates the 1024x768 JPEG set into --data unless that folder exists. Each variant is a fresh
process, timed from its start, and the variants take turns (--runs rounds):

- naive: the tutorial loop: full decode, timm's eval transform, fp32, the frozen backbone
  recomputed for every batch of every epoch;
- tuned: the same with bf16 autocast (where the CPU computes bf16 natively), channels_last and
  inference mode for the backbone: still recomputing it every epoch;
- train.py default (data.engine=auto), cold feature cache, the converted model cached by an
  earlier run; the same converting the backbone (a first run on a machine: an empty
  paths.engine_dir of its own); and train.py with data.engine=torch, the previous default.

A first train.py run (untimed) fills the ingest and converted-model caches, so that every
variant finds the ingest cache warm. Random weights (model.pretrained=false) do not change the
speed.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH = 5, 32


def hand_written(data: Path, tuned: bool) -> None:
    """The loop itself, run in its own process."""
    import timm
    import torch
    from PIL import Image
    from sklearn.model_selection import train_test_split
    from torch.utils.data import DataLoader, Dataset

    files = sorted(data.rglob("*.jpg"))
    classes = sorted({f.parent.name for f in files})
    labels = [classes.index(f.parent.name) for f in files]
    items = list(zip(files, labels, strict=True))
    train, rest = train_test_split(items, test_size=0.3, stratify=labels)
    val, test = train_test_split(rest, test_size=0.5, stratify=[y for _, y in rest])
    backbone = timm.create_model("inception_v3", pretrained=False, num_classes=0).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    transform = timm.data.create_transform(
        **timm.data.resolve_model_data_config(backbone), is_training=False
    )

    class Images(Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return transform(Image.open(path).convert("RGB")), label

    def loader(items, shuffle):
        return DataLoader(Images(items), BATCH, shuffle=shuffle, num_workers=2)

    bf16 = tuned and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if tuned:
        backbone = backbone.to(memory_format=torch.channels_last)

    def features(images):
        if not tuned:
            with torch.no_grad():
                return backbone(images)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return backbone(images.contiguous(memory_format=torch.channels_last)).float()

    head = torch.nn.Linear(backbone.num_features, len(classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(EPOCHS):
        for images, y in loader(train, True):
            loss = torch.nn.functional.cross_entropy(head(features(images).clone()), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # validation accuracy, every epoch
            sum((head(features(x)).argmax(1) == y).sum().item() for x, y in loader(val, False))
    with torch.no_grad():
        sum((head(features(x)).argmax(1) == y).sum().item() for x, y in loader(test, False))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_py(data: Path, work: Path, engine: str, engine_dir: Path | None = None) -> list[str]:
    return [
        sys.executable, "train.py", "model=inception_v3", "model.pretrained=false",
        f"data.data_dir={data}", "data.synthetic=null", f"data.engine={engine}",
        f"paths.cache_dir={work / 'cache'}", f"paths.output_dir={work / 'out'}",
        f"paths.log_dir={work / 'logs'}", "logger=none", f"trainer.max_epochs={EPOCHS}",
        "trainer.enable_progress_bar=false",
        f"paths.engine_dir={engine_dir or work / 'cache' / 'engines'}",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--loop", choices=["naive", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        hand_written(args.data, tuned=args.loop == "tuned")
        return
    if not args.data.exists():
        sys.path.insert(0, str(ROOT))
        from sem_cls.data.synthetic import generate_dataset

        generate_dataset(args.data, images_per_class=args.images_per_class)
    images = sum(1 for _ in args.data.rglob("*.jpg"))
    loop = [sys.executable, __file__, "--data", str(args.data), "--loop"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {
            "naive loop (fp32, recomputed)": [*loop, "naive"],
            "tuned loop (bf16, channels_last, recomputed)": [*loop, "tuned"],
            "train.py (default: engine auto)": train_py(args.data, work, "auto"),
            "train.py default, converting (a first run)": None,  # a new engine_dir each round
            "train.py data.engine=torch": train_py(args.data, work, "torch"),
        }
        timed(train_py(args.data, work, "auto"))  # fills the ingest and converted-model caches
        times = {name: [] for name in variants}
        load = os.getloadavg()
        for round_ in range(args.runs):
            for name, command in variants.items():
                shutil.rmtree(work / "cache" / "features", ignore_errors=True)  # cold features
                if command is None:
                    command = train_py(args.data, work, "auto", work / f"engines-{round_}")
                times[name].append(timed(command))
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
        load = max(load[0], os.getloadavg()[0])
    best = {name: min(values) for name, values in times.items()}
    default = best["train.py (default: engine auto)"]
    print(f"\n{images} JPEGs of 1024x768, {EPOCHS} epochs, frozen InceptionV3; load average up "
          f"to {load:.1f}; best of {args.runs}\n")  # fmt: skip
    print("| variant | s | default is faster by |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {seconds / default:.2f}x |")


if __name__ == "__main__":
    main()
