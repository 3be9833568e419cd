"""python score.py: an archive scored on Ray equals predict, resumes, refuses what is not its own,
and runs on a two-node cluster with token authentication. Every Ray here runs in a network and
PID namespace of its own (unshare): only loopback, and every Ray process ends with the run."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sem_cls.models.engines import resolve_engine
from tests.helpers import (
    IMAGE_SUFFIXES,
    ROOT,
    assert_user_error,
    best_checkpoint,
    run_in_process,
    run_predict,
)
from tests.network_guard import sitecustomize as guard_module

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="Ray runs here only in a network namespace of its own (unshare, as root)",
)

# The test's own auth token: Ray 2.60's token authentication stays on; nothing in ~/.ray is used.
RAY_TOKEN = secrets.token_hex(32)


def namespaced(script: str, ray_tmpdir: Path) -> list[str]:
    """`script` (sh) in new network and PID namespaces: only loopback is up, and when the
    namespace's first process ends every Ray process left in it is killed by the kernel."""
    ray = Path(sys.executable).with_name("ray")
    stop = f'RAY_TMPDIR={ray_tmpdir} "{ray}" stop --force >/dev/null 2>&1'
    wrapped = f"ip link set lo up && {{ {script}; }}; status=$?; {stop}; exit $status"
    return ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", wrapped]


def short_ray_tmpdir() -> Path:
    """A RAY_TMPDIR of its own, short: Ray's socket paths in it must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="sem-ray-", dir="/tmp"))


@pytest.fixture
def ray_tmpdir():
    folder = short_ray_tmpdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ray_env(ray_tmpdir: Path) -> dict:
    """The environment of a namespaced Ray run. The namespace has no interface but loopback, so
    nothing leaves it; the Python network guard stays out, as Ray's dashboard asks the cloud
    metadata address (169.254.169.254) once at start, usage stats off or not, and fails there."""
    ray_tmpdir.mkdir(parents=True, exist_ok=True)
    guard = Path(guard_module.__file__).parent
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment = {
        key: value for key, value in os.environ.items() if key != guard_module.LOG_VARIABLE
    }
    return {
        **environment,
        "PYTHONPATH": os.pathsep.join(p for p in python_path if Path(p) != guard),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(ray_tmpdir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": RAY_TOKEN,
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def score_command(tmp_path: Path, model, inputs, output, *overrides: str) -> str:
    args = [
        sys.executable,
        str(ROOT / "score.py"),
        f"ckpt_path={model}",
        f"inputs={inputs}",
        f"output={output}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *overrides,
    ]
    return " ".join(f"'{arg}'" for arg in args)


def run_score(tmp_path, ray_tmpdir, model, inputs, output, *overrides, timeout=240):
    command = "exec " + score_command(tmp_path, model, inputs, output, *overrides)
    return subprocess.run(
        namespaced(command, ray_tmpdir),
        capture_output=True,
        text=True,
        env=ray_env(ray_tmpdir),
        timeout=timeout,
    )


def read_scores(output: Path):
    import pandas as pd

    shards = sorted(output.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(shard) for shard in shards], ignore_index=True)


def write_archive(folder: Path, tiny_sem_dir: Path, copies: int = 1) -> Path:
    """Generated SEM images in nested folders, plus a corrupt, an empty and a non-image file
    named as images, and a file that is no image by its suffix."""
    images = sorted(p for p in tiny_sem_dir.rglob("*") if p.suffix in IMAGE_SUFFIXES)[::4]
    for copy in range(copies):
        for index, image in enumerate(images):
            target = folder / f"instrument_{index % 3}" / f"day_{copy}" / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    bad = folder / "bad"
    bad.mkdir(parents=True)
    (bad / "truncated.jpg").write_bytes(images[0].read_bytes()[:300])
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.tif").write_text("not an image")
    (folder / "README.txt").write_text("left out by its suffix")
    return folder


@pytest.fixture(scope="module")
def scored(trained_run, tiny_sem_dir, tmp_path_factory):
    """One local-Ray run on the archive, and predict's rows on the same files."""
    tmp_path = tmp_path_factory.mktemp("score")
    archive = write_archive(tmp_path / "archive", tiny_sem_dir)
    ckpt = best_checkpoint(trained_run[0])
    output = tmp_path / "scores"
    ray_tmpdir = short_ray_tmpdir()
    try:
        result = run_score(tmp_path, ray_tmpdir, ckpt, archive, output, "ray.num_cpus=2")
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = run_predict(trained_run, tmp_path, ckpt, archive)
    return dict(
        tmp_path=tmp_path,
        archive=archive,
        ckpt=ckpt,
        output=output,
        result=result,
        scores=read_scores(output),
        predicted={row["path"]: row for row in predicted},
    )


def test_rows_equal_predict(scored):
    scores, predicted = scored["scores"], scored["predicted"]
    assert sorted(scores["path"]) == sorted(predicted)  # every file once, the same files
    assert not scores["path"].str.endswith("README.txt").any()
    for row in scores.to_dict("records"):
        expected = predicted[row["path"]]
        assert row["predicted_class"] == expected["predicted_class"], row["path"]
        assert bool(row["error"]) == bool(expected["error"]), row["path"]
        if expected["error"]:
            assert row["confidence"] != row["confidence"]  # NaN: no number for a bad file
            continue
        assert abs(row["confidence"] - float(expected["confidence"])) < 1e-4
        assert abs(row["novelty"] - float(expected["novelty"])) < 1e-4
        for rank in (1, 2, 3):
            assert row[f"top{rank}_class"] == expected[f"top{rank}_class"]
            assert abs(row[f"top{rank}_prob"] - float(expected[f"top{rank}_prob"])) < 1e-4
    bad = scores[scores["path"].str.contains("/bad/")]
    assert len(bad) == 3 and (bad["error"] != "").all()


def test_rows_identify_the_file_the_model_and_engine(scored):
    scores = scored["scores"]
    for row in scores.to_dict("records"):
        info = os.stat(row["path"])
        assert (row["size"], row["mtime_ns"]) == (info.st_size, info.st_mtime_ns)
    assert set(scores["model"]) == {str(scored["ckpt"])}
    # The engine that ran, as predict resolves `auto` here (OpenVINO for a frozen backbone on CPU).
    expected, _ = resolve_engine("auto", torch.device("cpu"), frozen=True)
    assert set(scores["engine"]) == {expected}


def test_progress_summary_and_mlflow_run(scored, tmp_path):
    import mlflow

    result, scores = scored["result"], scored["scores"]
    shown = result.stdout + result.stderr
    assert "images/s" in shown and " left" in shown
    classified = int((scores["error"] == "").sum())
    assert f"{len(scores)} images scored: {classified} classified" in result.stdout
    assert "3 unreadable" in result.stdout
    tracking_uri = f"sqlite:///{scored['tmp_path'] / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sem-cls-score")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["images"] == len(scores)
    assert run.data.metrics["errors"] == 3
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.params["ckpt_path"] == str(scored["ckpt"])
    files = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"class_counts.json", "class_counts.png"} <= files
    saved = client.download_artifacts(run.info.run_id, "class_counts.json", str(tmp_path))
    table = json.loads(Path(saved).read_text())  # mlflow.log_table's "split" layout
    assert table["columns"] == ["class", "images"]
    counts = scores[scores["error"] == ""]["predicted_class"].value_counts().to_dict()
    assert dict(map(tuple, table["data"])) == counts


def test_unrelated_output_folder_is_refused_and_left_as_it_was(scored, tmp_path):
    output = tmp_path / "results"
    output.mkdir()
    (output / "thesis.parquet").write_bytes(b"my own work")
    result = run_in_process(
        "score.py",
        f"ckpt_path={scored['ckpt']}",
        f"inputs={scored['archive']}",
        f"output={output}",
        tmp_path=tmp_path,
    )
    assert_user_error(result, f"output={output}", "not the output of an earlier score run")
    assert [p.name for p in output.iterdir()] == ["thesis.parquet"]
    assert (output / "thesis.parquet").read_bytes() == b"my own work"


@pytest.mark.parametrize(
    "override, phrases",
    [
        ("ckpt_path=/nowhere/model.ckpt", ["/nowhere/model.ckpt"]),
        ("inputs=EMPTY", ["holds no image files"]),
        ("ray.address=127.0.0.1:9", ["ray.address=127.0.0.1:9", "does not answer"]),
        ("ray.actors=0", ["ray.actors=0"]),
    ],
)
def test_bad_input_is_refused_at_once(scored, tmp_path, override, phrases):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no image")
    key, value = override.split("=", 1)
    overrides = {
        "ckpt_path": str(scored["ckpt"]),
        "inputs": str(scored["archive"]),
        "output": str(tmp_path / "out"),
        key: value.replace("EMPTY", str(empty)),
    }
    started = time.monotonic()
    result = run_in_process(
        "score.py", *(f"{k}={v}" for k, v in overrides.items()), tmp_path=tmp_path
    )
    assert time.monotonic() - started < 30
    assert_user_error(result, *phrases)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_run_is_completed_by_a_rerun_with_every_file_once(
    scored, tiny_sem_dir, tmp_path, ray_tmpdir
):
    archive = write_archive(tmp_path / "archive", tiny_sem_dir, copies=6)
    output = tmp_path / "scores"
    command = "exec " + score_command(
        tmp_path, scored["ckpt"], archive, output, "ray.num_cpus=2", "shard_rows=8", "batch_size=4"
    )
    namespace = subprocess.Popen(
        namespaced(command, ray_tmpdir),
        env=ray_env(ray_tmpdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(output.glob("part-*.parquet")), "no shard written in time"
        # The driver is the namespace's first process, the child of unshare.
        (driver,) = Path(f"/proc/{namespace.pid}/task/{namespace.pid}/children").read_text().split()
        os.kill(int(driver), signal.SIGKILL)
        namespace.wait(timeout=60)
    finally:
        if namespace.poll() is None:
            namespace.kill()
            namespace.wait()
    scored_before = read_scores(output)
    partial = len(scored_before)
    files = {p for p in archive.rglob("*") if p.is_file() and p.suffix != ".txt"}
    assert partial < len(files)
    # Meanwhile one file is added and one already scored is changed: the rerun scores both too.
    changed = Path(scored_before["path"].iloc[0])
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    first = next(iter(sorted(files)))
    added = first.with_name(f"new{first.suffix}")
    shutil.copy(first, added)
    files.add(added)

    result = run_score(tmp_path, ray_tmpdir, scored["ckpt"], archive, output, "ray.num_cpus=2")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = read_scores(output)
    identity = ["path", "size", "mtime_ns"]
    rows = list(scores[identity].itertuples(index=False, name=None))
    current = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    assert sorted(key for key in rows if key in set(current)) == sorted(current)  # each once
    assert len(rows) == len(files) + 1  # and the changed file's earlier row, kept as it was
    assert f"{len(files) - partial + 1} images scored" in result.stdout


@pytest.mark.slow
def test_two_node_cluster_with_token_authentication(scored, tmp_path, ray_tmpdir):
    ray = Path(sys.executable).with_name("ray")
    output = tmp_path / "scores"
    port = 6391
    connect = (
        f"timeout 60 '{sys.executable}' -c 'import ray; ray.init(address=\"127.0.0.1:{port}\")'"
    )
    script = " && ".join(
        [
            f"'{ray}' start --head --port={port} --num-cpus=2 --include-dashboard=false "
            "--disable-usage-stats >/dev/null",
            f"'{ray}' start --address=127.0.0.1:{port} --num-cpus=2 --disable-usage-stats "
            ">/dev/null",
            score_command(
                tmp_path,
                scored["ckpt"],
                scored["archive"],
                output,
                f"ray.address=127.0.0.1:{port}",
                "ray.actors=2",
                "batch_size=4",
            ),
            # The same driver with another token is turned away: authentication is on.
            f"echo right-token-exit=$({connect} >/dev/null 2>&1; echo $?)",
            f"echo wrong-token-exit=$(RAY_AUTH_TOKEN={'0' * 64} {connect} >/dev/null 2>&1;echo $?)",
        ]
    )
    result = subprocess.run(
        namespaced(script, ray_tmpdir),
        capture_output=True,
        text=True,
        env=ray_env(ray_tmpdir),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "right-token-exit=0" in result.stdout
    assert "wrong-token-exit=" in result.stdout
    assert "wrong-token-exit=0" not in result.stdout
    scores = read_scores(output)
    assert scores["node"].nunique() == 2  # both nodes classified
    expected = scored["scores"].set_index("path")
    assert sorted(scores["path"]) == sorted(expected.index)
    for row in scores.to_dict("records"):
        assert row["predicted_class"] == expected.loc[row["path"], "predicted_class"]
        if not row["error"]:
            assert abs(row["confidence"] - expected.loc[row["path"], "confidence"]) < 1e-4
