"""Feature-extraction engines side by side: the backbone alone and the whole extraction pipeline.

    python bench/throughput.py [--backbone inception_v3] [--images 160] [--runs 3]

Every variant runs interleaved in one process (best of --runs), so a busy machine slows all of
them alike and the ratios hold. The ceiling is the plain eval-mode timm model (bf16 autocast
where the CPU computes bf16 natively), built here, not through the project. The pipeline is what
feature extraction runs: decode, info-bar crop, resize to uint8 pixels, backbone (which
normalises the batch). Weights do not change the
speed, so they are random. The pipeline decodes JPEGs at the scale the model needs (PIL's draft
mode); one more row runs the OpenVINO pipeline on full decodes, and the features of the two
decodes are compared (cosine). Last, the CPU time per image of each step, single-threaded
(decode, info-bar crop, resize to uint8 pixels) and the OpenVINO engine's per image over its
threads, and the ceiling they set on this machine's cores: cores / (preprocessing + inference
CPU time), against the backbone alone on them (cores / inference CPU time).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sem_cls.data.datamodule import SEMDataModule  # noqa: E402
from sem_cls.data.features import extract_features  # noqa: E402
from sem_cls.data.images import open_image, scale_box  # noqa: E402
from sem_cls.data.ingest import ingest  # noqa: E402
from sem_cls.data.manifest import SplitManifest  # noqa: E402
from sem_cls.data.samples import SEMImageDataset, normalised  # noqa: E402
from sem_cls.data.synthetic import generate_dataset  # noqa: E402
from sem_cls.models.build import build_model  # noqa: E402
from sem_cls.models.engines import TorchEngine, create_engine, native_bf16  # noqa: E402


class PlainModel:
    """The timm model in eval mode, bf16 autocast if asked: the ceiling."""

    def __init__(self, backbone, data_config: dict, bf16: bool):
        self.backbone, self.bf16 = backbone, bf16
        self.mean, self.std = data_config["mean"], data_config["std"]
        self.num_features = backbone.num_features
        self.device = torch.device("cpu")

    @torch.inference_mode()
    def __call__(self, images):
        images = normalised(images, self.mean, self.std)  # (B, H, W, 3) uint8 -> (B, 3, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.backbone(images.contiguous(memory_format=torch.channels_last)).float()


def backbone_alone(run, images: torch.Tensor, batches: int) -> tuple[float, float]:
    """img/s, and CPU ms per image over all the engine's threads."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        run(images)
    count = len(images) * batches
    return count / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / count


def steps_per_image(dataset) -> dict[str, float]:
    """CPU ms per image of each preprocessing step, single-threaded, as a loader worker runs
    them (SEMImageDataset.__getitem__)."""
    spent = {"decode (draft)": 0.0, "info-bar crop": 0.0, "resize to uint8 pixels": 0.0}
    for sample in dataset.samples:
        start = time.process_time()
        image, size = open_image(sample.path, "RGB", dataset.min_side, dataset.max_pixels)
        decoded = time.process_time()
        image = image.crop(scale_box(sample.crop_box, size, image.size))
        cropped = time.process_time()
        dataset.transform(image)
        times = (decoded - start, cropped - decoded, time.process_time() - cropped)
        for name, seconds in zip(spent, times, strict=True):
            spent[name] += seconds * 1000 / len(dataset)
    return spent


def pipeline(engine, dataset, batch_size: int, num_workers: int) -> float:
    out = torch.empty(len(dataset), engine.num_features).numpy()
    start = time.perf_counter()
    extract_features(engine, dataset, batch_size, num_workers, out)
    return len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--images", type=int, default=160, help="1024x768 JPEGs in the pipeline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="per backbone-alone measurement")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    # The project's frozen model, as train.py builds it.
    model, _ = build_model([str(i) for i in range(10)], backbone=args.backbone, pretrained=False)
    input_size = tuple(model.data_config["input_size"])
    plain = timm.create_model(args.backbone, pretrained=False, num_classes=0).eval()
    plain = plain.to(memory_format=torch.channels_last)
    plain.load_state_dict(model.backbone.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        openvino = create_engine("openvino", model.backbone, model.data_config, True, Path(tmp))
        # bf16 rows only where the CPU computes bf16: emulated, it is many times slower than
        # fp32 and the project never runs it (the engines fall back to fp32, said in the log).
        precisions = ["bf16", "fp32"] if native_bf16(torch.device("cpu")) else ["fp32"]
        engines = {}
        for precision in precisions:
            engines[f"ceiling {precision} (plain eval model)"] = PlainModel(
                plain, model.data_config, precision == "bf16"
            )
        for precision in precisions:
            engines[f"torch {precision}"] = TorchEngine(
                model.backbone, model.data_config, precision == "bf16"
            )
        engines[f"openvino {openvino.precision}"] = openvino
        data_dir = Path(tmp) / "synthetic"
        generate_dataset(data_dir, images_per_class=max(1, args.images // 10))
        manifest = SplitManifest.build(ingest(data_dir), ratios=(0.8, 0.1, 0.1))
        datamodule = SEMDataModule(manifest, model.data_config)
        datamodule.setup()
        samples = [sample for split in datamodule.samples.values() for sample in split]
        dataset = datamodule.image_dataset(samples)
        full_decode = SEMImageDataset(samples, dataset.transform, 0, dataset.max_pixels)
        decoded = f"openvino {openvino.precision}, full decode"

        # (B, H, W, 3) uint8, as the eval transform hands them over
        images = torch.randint(0, 256, (args.batch_size, *input_size[1:], 3), dtype=torch.uint8)
        alone = {name: 0.0 for name in engines}
        cpu = {name: float("inf") for name in engines}
        full = {name: 0.0 for name in engines}
        for run in engines.values():
            run(images)  # warm-up: kernels are picked on the first call
        for _ in range(args.runs):
            for name, run in engines.items():
                speed, cpu_ms = backbone_alone(run, images, args.batches)
                alone[name], cpu[name] = max(alone[name], speed), min(cpu[name], cpu_ms)
                print(f"backbone alone, {name}: {alone[name]:.1f} img/s", flush=True)
            for name, run in engines.items():
                speed = pipeline(run, dataset, args.batch_size, args.num_workers)
                full[name] = max(full[name], speed)
                print(f"pipeline, {name}: {speed:.1f} img/s", flush=True)
            speed = pipeline(openvino, full_decode, args.batch_size, args.num_workers)
            full[decoded] = max(full.get(decoded, 0.0), speed)
            print(f"pipeline, {decoded}: {speed:.1f} img/s", flush=True)
        features = []
        for images_of in (dataset, full_decode):
            features.append(torch.empty(len(samples), openvino.num_features).numpy())
            extract_features(openvino, images_of, args.batch_size, args.num_workers, features[-1])
        cosine = torch.nn.functional.cosine_similarity(*map(torch.from_numpy, features))
        steps = [steps_per_image(dataset) for _ in range(args.runs)]
        steps = {name: min(run[name] for run in steps) for name in steps[0]}

    best = precisions[0]  # what the project runs on this CPU
    ceiling = alone[f"ceiling {best} (plain eval model)"]
    torch_best = alone[f"torch {best}"], full[f"torch {best}"]
    print(
        f"\n{args.backbone} {input_size[-1]} px, batch {args.batch_size}, {torch.get_num_threads()}"
        f" engine threads, {args.num_workers} loader workers, {len(dataset)} JPEGs of 1024x768, "
        f"best of {args.runs}, interleaved"
    )
    header = ("engine", "backbone img/s", "vs ceiling", f"vs torch {best}", "pipeline img/s",
              "vs ceiling", f"vs torch {best}", "vs own backbone")  # fmt: skip
    print("{:34} {:>14} {:>10} {:>13} {:>14} {:>10} {:>13} {:>15}".format(*header))
    alone[decoded] = alone[f"openvino {openvino.precision}"]
    for name in full:
        a, p = alone[name], full[name]
        print(
            f"{name:34} {a:>14.1f} {a / ceiling:>10.2f} {a / torch_best[0]:>13.2f} "
            f"{p:>14.1f} {p / ceiling:>10.2f} {p / torch_best[1]:>13.2f} {p / a:>15.2f}"
        )
    similar = f"cosine min {cosine.min():.4f}, mean {cosine.mean():.4f}"
    print(f"features, draft vs full decode: {similar}")
    # What the cores allow: every image costs its preprocessing and its share of inference.
    cores = len(os.sched_getaffinity(0))
    ov_name = f"openvino {openvino.precision}"
    for name, ms in steps.items():
        print(f"CPU per image, {name}: {ms:.2f} ms")
    print(f"CPU per image, {ov_name} inference: {cpu[ov_name]:.2f} ms (best of {args.runs})")
    # CPU times, not wall times: the ratio holds on a busy machine.
    ceiling = cores * 1000 / (sum(steps.values()) + cpu[ov_name])
    backbone = cores * 1000 / cpu[ov_name]
    print(
        f"ceiling on {cores} cores: {ceiling:.1f} img/s against the backbone alone on them "
        f"{backbone:.1f} img/s: {ceiling / backbone:.2f}"
    )


if __name__ == "__main__":
    main()
