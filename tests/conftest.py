"""Shared fixtures: the network guard, a small generated SEM set, real SEM images, a trained run.
Helpers that are not fixtures live in helpers.py."""

import os
import socket
from pathlib import Path

# No test may reach a model hub: timm then fails at once instead of retrying for 47 s. Set before
# anything imports huggingface_hub (tests.helpers imports timm), which reads it once, on import.
os.environ["HF_HUB_OFFLINE"] = "1"
# Two test processes and the trainings, servers and Ray workers they start share few cores.
# OpenMP threads that spin while they wait (libgomp's default) then take the cores from the
# others: two tiny trainings at once took 51 s instead of 21 s (alone: the same 19 s either
# way). Set before torch loads libgomp, which reads it once; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from tests.helpers import ROOT, SHARED, compose_config, tiny_training_overrides  # noqa: E402
from tests.network_guard import sitecustomize as guard  # noqa: E402

os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def no_network(tmp_path_factory) -> Path:
    """Any connection beyond this machine fails the test that makes it (local servers are fine),
    here and in every Python process a test starts: network_guard/ goes first on their PYTHONPATH.
    Yields the file where attempts are recorded."""
    log = tmp_path_factory.mktemp("network") / "attempts.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guard.local_only(socket.socket.connect))
        patch.setattr(socket.socket, "connect_ex", guard.local_only(socket.socket.connect_ex))
        patch.setenv("PYTHONPATH", str(Path(guard.__file__).parent), prepend=os.pathsep)
        patch.setenv(guard.LOG_VARIABLE, str(log))
        yield log


@pytest.fixture(scope="session", autouse=True)
def shared_engine_dir(tmp_path_factory) -> Path:
    """One folder of converted OpenVINO backbones for the whole run, as on a user's machine,
    where every run and entry point shares paths.engine_dir: a backbone is converted once.
    Tests of the conversion itself give their own folder."""
    folder = tmp_path_factory.mktemp("engines")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEM_CLS_ENGINE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def network_attempts_fail_the_test(no_network):
    """Fails a test whose processes tried to connect out, even where the error was caught."""
    yield
    if no_network.exists():
        attempts = no_network.read_text()
        no_network.unlink()
        pytest.fail(f"{guard.MESSAGE}:\n{attempts}")


def shared_data(name: str) -> Path:
    """A folder of ../shared/data; the test is skipped only where ../shared is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: no real SEM images here")
    folder = SHARED / "data" / name
    assert folder.is_dir(), f"{folder} is missing although {SHARED} is present"
    return folder


@pytest.fixture(scope="session")
def real_sem_dir() -> Path:
    """Real SEM images: NFFA crops by class, and external/ images of other origins."""
    return shared_data("sem-real")


@pytest.fixture(scope="session")
def sem_bars_dir() -> Path:
    """Real SEM images with their info bars, and bars.tsv: where each bar starts."""
    return shared_data("sem-bars")


# Small enough for seconds per epoch, large enough for every class in every split.
TINY_IMAGES_PER_CLASS = 8
TINY_SIZE = (512, 384)


@pytest.fixture(scope="session")
def tiny_sem_dir(tmp_path_factory) -> Path:
    from sem_cls.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_dataset(root, images_per_class=TINY_IMAGES_PER_CLASS, seed=0, size=TINY_SIZE)
    return root


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
