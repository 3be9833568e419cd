"""Scale-out: DDP over two CPU processes (gloo) trains as one process does, into one output
folder, one checkpoint set and one MLflow run, here on a real MLflow tracking server."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tests.helpers import ROOT, artifact_paths, compose_config, tiny_training_overrides

# One batch holds the whole training split, in one process or split over two ranks, so both
# take the same gradient steps whatever the order the samplers draw in.
# DDP extracts with torch (the auto engine's rule); the one-process run must too, so that the
# comparison is of the distribution alone.
SAME_STEPS = ["data.batch_size=64", "data.engine=torch"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# requests and urllib would send even 127.0.0.1 through a configured proxy.
LOCAL_ENV = {"HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_py(work_dir: Path, *overrides: str, flags=()) -> subprocess.CompletedProcess:
    """train.py as a user runs it, with every output under `work_dir`."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *flags,
            f"paths.mlruns_dir={work_dir / 'mlruns'}",
            f"paths.log_dir={work_dir / 'logs'}",
            f"paths.cache_dir={work_dir / 'cache'}",
            *overrides,
        ],
        cwd=work_dir,
        env={**os.environ, **LOCAL_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` as `make server` starts it, on a free port of 127.0.0.1: (URI, folder)."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = (root / "server.log").open("w")
    # A session of its own, so the server and its workers stop together.
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root
    )
    uri = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                if opener.open(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer: {(root / 'server.log').read_text()}")
            time.sleep(0.5)
        with pytest.MonkeyPatch.context() as patch:  # for this process's MLflow client
            for key, value in LOCAL_ENV.items():
                patch.setenv(key, value)
            yield uri, root
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def ddp_run(tiny_sem_dir, tmp_path_factory, tracking_server):
    """The tiny training run on two gloo ranks, tracked on the server: (work dir, stdout,
    MLflow client, the experiment's runs)."""
    uri, _ = tracking_server
    work_dir = tmp_path_factory.mktemp("ddp")
    result = train_py(
        work_dir,
        *tiny_training_overrides(tiny_sem_dir),
        *SAME_STEPS,
        *DDP,
        f"logger.mlflow.tracking_uri={uri}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sem-cls-demo")
    runs = client.search_runs([experiment.experiment_id])
    return work_dir, result.stdout, client, runs


@pytest.fixture(scope="module")
def one_process_run(tiny_sem_dir, tmp_path_factory):
    """The same run in this process, on one device: (config, returned metrics)."""
    from train import train

    work_dir = tmp_path_factory.mktemp("one_process")
    # Untracked: the metrics train() returns are what is compared.
    overrides = [*tiny_training_overrides(tiny_sem_dir), *SAME_STEPS, "trainer=cpu", "logger=none"]
    cfg = compose_config("train", work_dir, overrides)
    return cfg, train(cfg)


@pytest.mark.slow  # DDP run and tracking server
def test_ddp_is_one_run_one_output_folder_one_checkpoint_set(ddp_run):
    work_dir, stdout, client, runs = ddp_run
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # Rank 1 logged nothing of its own: one value per epoch, one summary.
    for name in ("train/loss", "val/acc", "val/acc_best"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    assert stdout.count("MLflow run ") == 1
    # Rank 1 ran in rank 0's output folder (Lightning passes it hydra.run.dir).
    (run_dir,) = (work_dir / "logs" / "demo" / "runs").iterdir()
    assert not (work_dir / "logs" / "demo" / "multiruns").exists()
    assert (run_dir / "mlflow_run_id").read_text() == run.info.run_id
    assert run.data.params["paths/output_dir"] == str(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch_001.ckpt",
        "last.ckpt",
    ]
    checkpoints = [p for p in artifact_paths(client, run.info.run_id) if p.endswith(".ckpt")]
    assert len(checkpoints) == 2


@pytest.mark.slow  # DDP run and tracking server
def test_ddp_metrics_equal_one_process(ddp_run, one_process_run):
    _, _, _, (run,) = ddp_run
    _, metrics = one_process_run
    compared = {name: value for name, value in metrics.items() if "/" in name}
    assert {"train/loss", "val/acc", "test/acc", "test/f1_macro"} <= set(compared)
    assert set(compared) <= set(run.data.metrics)
    for name, value in compared.items():
        assert run.data.metrics[name] == pytest.approx(value, abs=1e-4), name


@pytest.mark.slow  # DDP run and tracking server
def test_sharded_feature_extraction_equals_one_process(ddp_run, one_process_run):
    work_dir, *_ = ddp_run
    cfg, _ = one_process_run
    files = sorted(p for p in (work_dir / "cache" / "features").rglob("*") if p.is_file())
    alone = sorted(Path(cfg.paths.cache_dir, "features").rglob("*.npy"))
    # One entry (and its checksum file) per split, under the same keys, and no shard or
    # partial file left behind.
    assert not [p for p in files if ".partial" in p.name]
    sharded = [p for p in files if p.suffix == ".npy"]
    assert [p.name for p in sharded] == [p.name for p in alone]
    assert {p.with_suffix(".json") for p in sharded} == {p for p in files if p.suffix == ".json"}
    assert len(alone) == 3
    for ddp_entry, entry in zip(sharded, alone, strict=True):
        # fp32 noise only: each rank's batches and threads pick other kernels (seen: 6.8e-6 rel).
        np.testing.assert_allclose(np.load(ddp_entry), np.load(entry), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # DDP run and tracking server
def test_tracking_server_stores_and_serves_the_artifacts(ddp_run, tracking_server, tmp_path):
    _, server_root = tracking_server
    _, _, client, (run,) = ddp_run
    # The server chose where artifacts go (conf artifact_location is for local stores only).
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert list((server_root / "artifacts").rglob("manifest.csv"))
    paths = artifact_paths(client, run.info.run_id)
    assert {"data/manifest.csv", "reports/test/confusion_matrix.csv"} <= set(paths)
    best = next(p for p in paths if p.endswith(".ckpt") and "last" not in p)
    checkpoint = torch.load(
        client.download_artifacts(run.info.run_id, best, str(tmp_path)), weights_only=True
    )
    assert checkpoint["mlflow_run_id"] == run.info.run_id


def test_ddp_in_a_local_sweep_is_refused(tiny_sem_dir, tmp_path):
    overrides = [*tiny_training_overrides(tiny_sem_dir), *DDP, "logger=none"]
    result = train_py(tmp_path, *overrides, flags=["-m"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "trainer.strategy=ddp_spawn" in result.stderr
    assert "Traceback" not in result.stderr


def test_http_tracking_leaves_artifact_location_to_the_server(tmp_path):
    from sem_cls.tracking import ContinuingMLFlowLogger

    def artifact_location(uri):
        logger = ContinuingMLFlowLogger(tracking_uri=uri, artifact_location=str(tmp_path))
        return logger._artifact_location

    assert artifact_location("http://127.0.0.1:5000") is None
    assert artifact_location("https://127.0.0.1:5443") is None


def test_ranks_above_zero_leave_the_sqlite_store_alone(tmp_path, monkeypatch):
    # Ranks started together (srun, torchrun) must not all set up the same new database.
    from lightning.pytorch.utilities import rank_zero_only

    from sem_cls.tracking import ContinuingMLFlowLogger

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = ContinuingMLFlowLogger(tracking_uri=uri, experiment_name="x")
    assert not (tmp_path / "mlflow.db").exists()
    assert logger.run_id is None  # Lightning's stand-in experiment: nothing is recorded


class GatheringRanks:
    """Stands in for a LightningModule on rank 0 of len(ranks) DDP processes: all_gather stacks
    rank 0's tensor with the other ranks' ones of the same name, as Lightning does."""

    def __init__(self, ranks: list[dict]):
        from types import SimpleNamespace

        self.ranks = ranks
        self.trainer = SimpleNamespace(world_size=len(ranks))

    def all_gather(self, tensor):
        if len(self.ranks) == 1:
            return tensor
        (name,) = [k for k, v in self.ranks[0].items() if torch.equal(v, tensor)]
        return torch.stack([rank[name] for rank in self.ranks])


def test_gathered_predictions_are_placed_by_sample_index():
    from sem_cls.data.samples import in_set_order

    # Five test images over two ranks: rank 0 drew 0, 2, 4; rank 1 drew 1, 3 and 0 again, the
    # DistributedSampler's padding. Each image's logit is its own index, to see where it lands.
    def drawn(indices):
        index = torch.tensor(indices)
        return {"index": index, "logits": index[:, None].float() * torch.ones(1, 3)}

    ranks = [drawn([0, 2, 4]), drawn([1, 3, 0])]
    placed = in_set_order(GatheringRanks(ranks), [ranks[0]])
    assert placed["logits"][:, 0].tolist() == [0, 1, 2, 3, 4], "each image once, in set order"
    assert placed["logits"].shape == (5, 3)
    one_process = [drawn([3, 0, 1]), drawn([2, 4])]  # two batches, any order
    placed = in_set_order(GatheringRanks([{}]), one_process)
    assert placed["logits"][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_compile_applies_to_a_fine_tuned_backbone_only(tmp_path):
    import hydra

    def classifier(*overrides):
        cfg = compose_config(
            "train", tmp_path, ["model=efficientnet_lite0", "model.pretrained=false", *overrides]
        )
        return hydra.utils.instantiate(cfg.model, class_names=["a", "b"], _convert_="all")

    compiled = classifier("model.compile=true", "model.freeze=none")
    assert compiled.model.backbone._compiled_call_impl is not None
    assert classifier("model.compile=true").model.backbone._compiled_call_impl is None
    # Compiled in place: checkpoints keep the plain names, and the spec a loader rebuilds the
    # model from says nothing of compiling.
    assert not any("_orig_mod" in name for name in compiled.state_dict())
    assert "compile" not in compiled.model.spec
