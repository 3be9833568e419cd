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


def split_manifest(data_dir: Path, manifest: Path | None = None, **settings):
    """The SplitManifest of `data_dir` (ingested in this process), built with `settings` as
    SplitManifest.build takes them, or read from `manifest`."""
    from sem_cls.data.ingest import ingest
    from sem_cls.data.manifest import SplitManifest

    ingested = ingest(data_dir, workers=1, progress=False)
    if manifest is not None:
        return SplitManifest.read(manifest, ingested)
    return SplitManifest.build(ingested, **settings)


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
