"""Feature-extraction engines side by side: the backbone alone and the whole extraction pipeline.

    python bench/throughput.py [--backbone inception_v3] [--images 160] [--runs 3]

Every variant runs interleaved in one process (best of --runs), so a busy machine slows all of
them alike and the ratios hold. The ceiling is the plain eval-mode timm model (bf16 autocast
where the CPU computes bf16 natively), built here, not through the project. The pipeline is what
feature extraction runs: decode, info-bar crop, resize, backbone. Weights do not change the
speed, so they are random. The pipeline decodes JPEGs at the scale the model needs (PIL's draft
mode); one more row runs the OpenVINO pipeline on full decodes, and the features of the two
decodes are compared (cosine).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sem_cls.data.datamodule import SEMDataModule  # noqa: E402
from sem_cls.data.features import extract_features  # noqa: E402
from sem_cls.data.ingest import ingest  # noqa: E402
from sem_cls.data.manifest import SplitManifest  # noqa: E402
from sem_cls.data.samples import SEMImageDataset  # noqa: E402
from sem_cls.data.synthetic import generate_dataset  # noqa: E402
from sem_cls.models.build import build_model  # noqa: E402
from sem_cls.models.engines import TorchEngine, create_engine, native_bf16  # noqa: E402


class PlainModel:
    """The timm model in eval mode, bf16 autocast if asked: the ceiling."""

    def __init__(self, backbone, bf16: bool):
        self.backbone, self.bf16 = backbone, bf16
        self.num_features = backbone.num_features
        self.device = torch.device("cpu")

    @torch.inference_mode()
    def __call__(self, images):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.backbone(images.contiguous(memory_format=torch.channels_last)).float()


def backbone_alone(run, images: torch.Tensor, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        run(images)
    return len(images) * batches / (time.perf_counter() - start)


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
        openvino = create_engine("openvino", model.backbone, input_size, True, Path(tmp))
        # bf16 rows only where the CPU computes bf16: emulated, it is many times slower than
        # fp32 and the project never runs it (the engines fall back to fp32, said in the log).
        precisions = ["bf16", "fp32"] if native_bf16(torch.device("cpu")) else ["fp32"]
        engines = {}
        for precision in precisions:
            engines[f"ceiling {precision} (plain eval model)"] = PlainModel(
                plain, precision == "bf16"
            )
        for precision in precisions:
            engines[f"torch {precision}"] = TorchEngine(model.backbone, precision == "bf16")
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

        images = torch.randn(args.batch_size, *input_size)
        alone = {name: 0.0 for name in engines}
        full = {name: 0.0 for name in engines}
        for run in engines.values():
            run(images)  # warm-up: kernels are picked on the first call
        for _ in range(args.runs):
            for name, run in engines.items():
                alone[name] = max(alone[name], backbone_alone(run, images, args.batches))
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


if __name__ == "__main__":
    main()
