"""Shared fixtures: a small generated SEM set, configs as train.py composes them, a trained run."""

import os
import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
# No test may reach a model hub: timm then fails at once instead of retrying for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(scope="session", autouse=True)
def no_network():
    """Any connection beyond this machine fails the test that makes it (local servers are fine)."""
    connect = socket.socket.connect

    def local_only(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise RuntimeError(f"a test tried to reach the network: {address}")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", local_only)
        yield


# Small enough for seconds per epoch, large enough for every class in every split.
TINY_IMAGES_PER_CLASS = 8
TINY_SIZE = (512, 384)


@pytest.fixture(scope="session")
def tiny_sem_dir(tmp_path_factory) -> Path:
    from sem_cls.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_dataset(root, images_per_class=TINY_IMAGES_PER_CLASS, seed=0, size=TINY_SIZE)
    return root


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


@pytest.fixture(scope="session")
def trained_run(tiny_sem_dir, tmp_path_factory):
    """One short training run on the tiny set: (config, returned metrics, MLflow client, run)."""
    import mlflow

    from train import train

    work_dir = tmp_path_factory.mktemp("trained")
    cfg = compose_config("train", work_dir, tiny_training_overrides(tiny_sem_dir))
    metrics = train(cfg)
    client = mlflow.MlflowClient(cfg.logger.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.mlflow.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return cfg, metrics, client, run


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
