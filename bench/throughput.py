"""Backbone throughput: the ceiling on random tensors vs the full pipeline from JPEG files.

    python bench/throughput.py [--images-per-class 16] [--batch-size 32] [--num-workers 1]

The pipeline is what feature extraction runs: decode, info-bar crop, resize, backbone. Weights
do not change the speed, so InceptionV3 runs with random ones (its ImageNet weights need the hub).
"""

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sem_cls.data.datamodule import SEMDataModule  # noqa: E402
from sem_cls.data.features import extract_features  # noqa: E402
from sem_cls.data.ingest import ingest  # noqa: E402
from sem_cls.data.manifest import SplitManifest  # noqa: E402
from sem_cls.data.synthetic import generate_dataset  # noqa: E402

BACKBONES = ["inception_v3", "tf_efficientnet_lite0"]


@torch.inference_mode()
def ceiling(backbone, input_size, batch_size: int, batches: int, bf16: bool) -> float:
    """img/s of the backbone alone on random (B, 3, H, W) batches, channels_last."""
    images = torch.randn(batch_size, *input_size).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        backbone(images)  # warm-up: oneDNN picks its kernels on the first call
        start = time.perf_counter()
        for _ in range(batches):
            backbone(images)
    return batch_size * batches / (time.perf_counter() - start)


def best_of(runs: int, measure) -> float:
    # Shared machines wobble; the best of a few runs is the repeatable figure.
    return max(measure() for _ in range(runs))


def pipeline(backbone, datamodule, batch_size: int, num_workers: int, bf16: bool) -> float:
    """img/s of decode + crop + resize + backbone over every image; run after `ceiling`."""
    samples = [sample for split in datamodule.samples.values() for sample in split]
    dataset = datamodule.image_dataset(samples)
    out = torch.empty(len(dataset), backbone.num_features).numpy()
    start = time.perf_counter()
    extract_features(backbone, dataset, batch_size, num_workers, bf16, out)
    return len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp()) / "synthetic"
    generate_dataset(data_dir, images_per_class=args.images_per_class)
    rows = []
    for name in BACKBONES:
        backbone = timm.create_model(name, pretrained=False, num_classes=0).eval()
        backbone = backbone.to(memory_format=torch.channels_last)
        timm.utils.freeze(backbone)
        manifest = SplitManifest.build(ingest(data_dir), ratios=(0.8, 0.1, 0.1))
        datamodule = SEMDataModule(manifest)
        datamodule.data_config = timm.data.resolve_model_data_config(backbone)
        datamodule.setup()
        input_size = datamodule.data_config["input_size"]
        for bf16 in (False, True):
            # As many images as the pipeline runs, in full batches.
            batches = max(2, args.images_per_class * 10 // args.batch_size)
            top = best_of(
                args.runs, partial(ceiling, backbone, input_size, args.batch_size, batches, bf16)
            )
            full = best_of(
                args.runs,
                partial(pipeline, backbone, datamodule, args.batch_size, args.num_workers, bf16),
            )
            rows.append((name, input_size[-1], "bf16" if bf16 else "fp32", top, full))

    images = args.images_per_class * 10
    print(
        f"\n{images} JPEGs of 1024x768, batch {args.batch_size}, {args.num_workers} workers, ",
        end="",
    )
    print(f"{torch.get_num_threads()} torch threads, channels_last")
    header = ("backbone", "input", "dtype", "ceiling img/s", "pipeline img/s", "share")
    print("{:24} {:>5} {:>5} {:>14} {:>15} {:>6}".format(*header))
    for name, size, dtype, top, full in rows:
        print(f"{name:24} {size:>5} {dtype:>5} {top:>14.1f} {full:>15.1f} {full / top:>6.0%}")


if __name__ == "__main__":
    main()
