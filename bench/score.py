"""score.py on a local Ray against the predict CLI on the same images and cores, and one actor's
CPU time split into decoding and inference, from which docs/performance.md projects a node.

    python bench/score.py [--images 2000] [--work /tmp/sem-score-bench] [--backbone inception_v3]
                          [--fp32]

Generates `--images` SEM-like 1024x768 JPEGs and a small model (two epochs on 80 smaller images)
once under --work, then runs both commands as a user would, one after the other. The model is
the demo's (EfficientNet-Lite0, ImageNet weights), or with `--backbone inception_v3` the default
config's frozen InceptionV3 with random weights (model.pretrained=false): weights do not change
the speed, and ImageNet's cannot be downloaded everywhere. score.py runs in a network and PID
namespace of its own (unshare, as root), as in the tests: Ray there sees only loopback and ends
with the run. `--fp32` runs both in fp32 (bf16=false), as on a CPU without native bf16.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"


def trained_model(work: Path, backbone: str | None) -> Path:
    """A checkpoint, trained once: the demo's, or a frozen `backbone` with random weights."""
    logs = work / (f"model-{backbone}" if backbone else "model")
    found = sorted(logs.rglob("checkpoints/epoch_*.ckpt"))
    if found:
        return found[0]
    from sem_cls.data.synthetic import generate_dataset

    data = work / "train-data"
    if not data.exists():
        generate_dataset(data, images_per_class=8, seed=0, size=(512, 384))
    model = [f"model={backbone}", "model.pretrained=false"] if backbone else ["experiment=demo"]
    command = [
        sys.executable, str(ROOT / "train.py"), *model, f"data.data_dir={data}",
        "data.synthetic=null", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
        f"paths.log_dir={logs}", f"paths.mlruns_dir={work / 'mlruns'}",
        f"paths.cache_dir={work / 'cache'}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return sorted(logs.rglob("checkpoints/epoch_*.ckpt"))[0]


def timed(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return time.perf_counter() - start


def actor_split(ckpt: Path, files: list[Path], bf16: bool | None, batch_size: int = 32) -> dict:
    """One actor's work in this process, as a Ray actor does it: CPU seconds per image (of all
    its threads) of reading and preparing (prepare_images) against classifying
    (score_images)."""
    import numpy as np
    import torch

    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.predictor import Predictor

    torch.set_num_threads(1)
    engines = os.environ.get("SEM_CLS_ENGINE_DIR", ROOT / "cache" / "engines")  # the commands'
    settings = PredictorSettings(device="cpu", bf16=bf16)
    predictor = Predictor.load(str(ckpt), settings, cache_dir=engines)
    from sem_cls.scoring import prepare_images

    prepare = dict(
        data_config=predictor.model.data_config,
        info_bar=predictor.settings.info_bar,
        max_pixels=predictor.settings.max_pixels,
        stores=[],  # local files only
    )
    decode = infer = 0.0
    for start in range(0, len(files), batch_size):
        paths = [str(p) for p in files[start : start + batch_size]]
        batch = {
            "path": np.array(paths),
            "store": np.full(len(paths), -1),  # -1: a local file, not an object store's
            "error": np.array([""] * len(paths), dtype=object),
        }
        began = time.process_time()
        batch = prepare_images(batch, **prepare)
        middle = time.process_time()
        predictor.score_images(torch.from_numpy(batch["image"]))
        decode, infer = decode + middle - began, infer + time.process_time() - middle
    return {
        "decode_cpu_s_per_image": decode / len(files),
        "infer_cpu_s_per_image": infer / len(files),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sem-score-bench"))
    parser.add_argument("--split-images", type=int, default=256, help="for the actor's CPU split")
    parser.add_argument("--backbone", help="a conf/model name, random weights (default: the demo)")
    parser.add_argument("--fp32", action="store_true", help="bf16=false for both commands")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    images = work / f"images-{args.images}"
    if not images.exists():
        from sem_cls.data.synthetic import generate_dataset

        generate_dataset(images, images_per_class=args.images // 10, seed=1, size=(1024, 768))
    files = sorted(p for p in images.rglob("*.jpg"))
    ckpt = trained_model(work, args.backbone)
    common = [f"paths.log_dir={work / 'logs'}", f"paths.mlruns_dir={work / 'mlruns'}"]
    common += ["bf16=false"] if args.fp32 else []

    # A fresh folder per run: nothing already under --work is replaced or removed.
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    output = run_dir / "predictions.csv"
    # The backbone converted before the clock starts: both commands find it cached, as every
    # run after a user's first does.
    timed(
        [sys.executable, "-m", "sem_cls.predict", f"ckpt_path={ckpt}", f"inputs={files[0]}",
         f"output={run_dir / 'first.csv'}", *common]
    )  # fmt: skip
    predict_s = timed(
        [sys.executable, "-m", "sem_cls.predict", f"ckpt_path={ckpt}", f"inputs={images}",
         f"output={output}", *common]
    )  # fmt: skip

    scores = run_dir / "scores"
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="sem-ray-", dir="/tmp"))
    score = " ".join(
        f"'{a}'"
        for a in [sys.executable, str(ROOT / "score.py"), f"ckpt_path={ckpt}", f"inputs={images}",
                  f"output={scores}", *common]
    )  # fmt: skip
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        score_s = timed(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
             f"ip link set lo up && exec {score}"],
            env,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)

    split = actor_split(ckpt, files[: args.split_images], False if args.fp32 else None)
    per_image = split["decode_cpu_s_per_image"] + split["infer_cpu_s_per_image"]
    result = {
        "model": args.backbone or "demo (tf_efficientnet_lite0)",
        "precision": "fp32" if args.fp32 else "as trained (bf16 where native)",
        "images": len(files),
        "predict_wall_s": round(predict_s, 1),
        "predict_images_per_s": round(len(files) / predict_s, 2),
        "score_wall_s": round(score_s, 1),
        "score_images_per_s": round(len(files) / score_s, 2),
        "score_vs_predict": round(predict_s / score_s, 3),
        **{key: round(value, 4) for key, value in split.items()},
        "one_actor_images_per_s": round(1 / per_image, 2),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
