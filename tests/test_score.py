"""python score.py: an archive scored on Ray equals predict, reads an S3 bucket as it reads
files, resumes, refuses what is not its own, and runs on a two-node cluster with token
authentication. Every Ray here runs in a network and PID namespace of its own (unshare): only
loopback, and every Ray process (and the S3 server beside them) ends with the run."""

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
from tests.s3_store import AWS_ENV, fill_bucket, start_store

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


def run_namespaced(script: str, ray_tmpdir: Path, timeout: int = 300, env: dict | None = None):
    """`script` (sh) in namespaced(), in ray_env plus `env`, its output captured."""
    environment = {**ray_env(ray_tmpdir), **(env or {})}
    command = namespaced(script, ray_tmpdir)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)


def run_score(tmp_path, ray_tmpdir, model, inputs, output, *overrides, timeout=240):
    command = "exec " + score_command(tmp_path, model, inputs, output, *overrides)
    return run_namespaced(command, ray_tmpdir, timeout)


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


# The bucket's address inside the namespace, where nothing else listens (MinIO's usual port).
S3_PORT = 9000
S3_PREFIX = "s3://sem-archive/scans"
S3_INPUTS = f"{S3_PREFIX}?endpoint_override=127.0.0.1:{S3_PORT}&scheme=http"


def write_bucket(folder: Path, archive: Path) -> Path:
    """What the bucket holds: four of the archive's images at their relative paths, a corrupt
    image and a file that is no image by its suffix."""
    images = sorted(
        p for p in archive.rglob("*") if p.suffix in IMAGE_SUFFIXES and "bad" not in p.parts
    )
    for image in images[:4]:
        target = folder / image.relative_to(archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    (folder / "corrupt.jpg").write_bytes(images[0].read_bytes()[:300])  # truncated
    (folder / "notes.txt").write_text("left out by its suffix")
    return folder


def run_with_s3_store(tmp_path, ray_tmpdir, bucket: Path, *commands: str) -> list:
    """`commands` (sh) one after the other in one namespace, beside an S3 server on its loopback
    that holds `bucket` under S3_PREFIX: the CompletedProcess of each one that ran (they stop at
    the first that fails)."""
    ready, store_log = tmp_path / "s3-ready", tmp_path / "s3-store.log"
    store = f"'{sys.executable}' '{ROOT / 'tests' / 's3_store.py'}'"
    out = [tmp_path / f"command-{index}" for index in range(len(commands))]
    chain = " && ".join(f"{c} >'{o}.out' 2>'{o}.err'" for c, o in zip(commands, out, strict=True))
    script = "\n".join(
        [
            f"{store} '{bucket}' {S3_PREFIX.removeprefix('s3://')} {S3_PORT} '{ready}' "
            f">'{store_log}' 2>&1 &",
            f"i=0; until [ -e '{ready}' ] || [ $i -ge 600 ]; do i=$((i + 1)); sleep 0.1; done",
            f"[ -e '{ready}' ] && {chain}",
        ]
    )
    whole = run_namespaced(script, ray_tmpdir, env=AWS_ENV)
    assert ready.exists(), f"no S3 server in time: {store_log.read_text()[-3000:]}"
    ran = [o for o in out if o.with_suffix(".out").exists()]
    return [
        subprocess.CompletedProcess(
            commands[index],
            whole.returncode if index == len(ran) - 1 else 0,  # the chain stops at a failure
            o.with_suffix(".out").read_text(),
            o.with_suffix(".err").read_text(),
        )
        for index, o in enumerate(ran)
    ]


@pytest.fixture(scope="module")
def scored(trained_run, tiny_sem_dir, tmp_path_factory):
    """One local-Ray run on the archive and on an S3 bucket that holds a few of its images (a
    moto server on the namespace's loopback), a rerun of it beside the same bucket, and
    predict's rows on the archive's files."""
    tmp_path = tmp_path_factory.mktemp("score")
    archive = write_archive(tmp_path / "archive", tiny_sem_dir)
    bucket = write_bucket(tmp_path / "bucket", archive)
    ckpt = best_checkpoint(trained_run[0])
    output = tmp_path / "scores"
    inputs = f'[{archive},"{S3_INPUTS}"]'
    command = score_command(tmp_path, ckpt, inputs, output, "ray.num_cpus=2")
    ray_tmpdir = short_ray_tmpdir()
    try:
        results = run_with_s3_store(tmp_path, ray_tmpdir, bucket, command, command)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(results) == 2
    predicted = run_predict(trained_run, tmp_path, ckpt, archive)
    rows = read_scores(output)
    in_bucket = rows["path"].str.startswith("s3://")
    return dict(
        tmp_path=tmp_path,
        archive=archive,
        bucket=bucket,
        ckpt=ckpt,
        output=output,
        result=results[0],
        rerun=results[1],
        rows=rows,
        scores=rows[~in_bucket].reset_index(drop=True),
        objects=rows[in_bucket].reset_index(drop=True),
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


def test_objects_of_an_s3_bucket_score_as_the_same_files(scored):
    objects, files = scored["objects"], scored["scores"].set_index("path")
    bucket = scored["bucket"]
    expected = {
        f"{S3_PREFIX}/{p.relative_to(bucket).as_posix()}": p
        for p in bucket.rglob("*")
        if p.is_file() and p.suffix != ".txt"
    }
    assert sorted(objects["path"]) == sorted(expected)  # full URIs, each object once
    for row in objects.to_dict("records"):
        local = scored["archive"] / expected[row["path"]].relative_to(bucket)
        if not local.exists():  # the corrupt object
            assert row["error"] and row["confidence"] != row["confidence"], row
            continue
        assert row["size"] == local.stat().st_size and row["mtime_ns"] > 0
        same = files.loc[str(local)]
        assert not row["error"] and row["predicted_class"] == same["predicted_class"]
        for column in ["confidence", "novelty", "top1_prob", "top2_prob", "top3_prob"]:
            assert abs(row[column] - same[column]) < 1e-4, (row["path"], column)
        assert [row[f"top{k}_class"] for k in (1, 2, 3)] == [
            same[f"top{k}_class"] for k in (1, 2, 3)
        ]
    # The rerun lists the bucket again and finds every object scored.
    assert "0 images scored" in scored["rerun"].stdout
    assert f"{len(scored['rows'])} already scored" in scored["rerun"].stdout


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

    result, scores = scored["result"], scored["rows"]  # the archive's and the bucket's
    shown = result.stdout + result.stderr
    assert "images/s" in shown and " left" in shown
    classified = int((scores["error"] == "").sum())
    assert f"{len(scores)} images scored: {classified} classified" in result.stdout
    assert "4 unreadable" in result.stdout
    tracking_uri = f"sqlite:///{scored['tmp_path'] / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sem-cls-score")
    run, rerun = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert (rerun.data.metrics["images"], rerun.data.metrics["already_scored"]) == (0, len(scores))
    assert run.data.metrics["images"] == len(scores)
    assert run.data.metrics["errors"] == 4
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.params["ckpt_path"] == str(scored["ckpt"])
    assert S3_INPUTS in run.data.params["inputs"]
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
        # An S3 store that does not answer: its SDK's three tries take about 6 s.
        (
            f'inputs="{S3_PREFIX}?endpoint_override=127.0.0.1:9&scheme=http"',
            [S3_PREFIX, "cannot be listed"],
        ),
        ("ray.address=127.0.0.1:9", ["ray.address=127.0.0.1:9", "does not answer"]),
        ("ray.actors=0", ["ray.actors=0"]),
    ],
)
def test_bad_input_is_refused_at_once(scored, tmp_path, monkeypatch, override, phrases):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
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


def test_every_check_before_ray_runs_without_torch(scored, tmp_path):
    """Torch loads beside Ray's start, not before it: the driver's last check before Ray (the
    model is there) answers in an interpreter where importing torch fails."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch before Ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    missing = tmp_path / "missing.ckpt"
    command = [
        sys.executable, str(ROOT / "score.py"), f"ckpt_path={missing}",
        f"inputs={scored['archive']}", f"output={tmp_path / 'out'}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}", f"paths.log_dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(result, f"ckpt_path={missing} does not exist")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def s3_store(monkeypatch):
    """An S3 server on loopback in this process, the AWS variables set for it: its host:port."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    server, endpoint = start_store()
    yield endpoint
    server.stop()


def test_a_bucket_that_does_not_exist_is_refused_at_once(trained_run, s3_store, tmp_path):
    (tmp_path / "bucket").mkdir()  # the store answers, and holds another bucket
    (tmp_path / "bucket" / "a.png").write_bytes(b"an object")
    fill_bucket(s3_store, "sem-archive/scans", tmp_path / "bucket")
    # Credentials written into the URI are never shown: the user info, keys, secrets, tokens.
    key_id, secret = "AKIASEMCLSTESTS", "secret-in-the-uri"
    uri = f"s3://{key_id}:{secret}@no-such-bucket/scans?endpoint_override={s3_store}&scheme=http"
    started = time.monotonic()
    result = run_in_process(
        "score.py",
        f"ckpt_path={best_checkpoint(trained_run[0])}",
        f'inputs="{uri}"',
        f"output={tmp_path / 'out'}",
        tmp_path=tmp_path,
    )
    assert time.monotonic() - started < 30
    assert_user_error(
        result, "s3://no-such-bucket/scans", "the bucket no-such-bucket does not exist"
    )
    assert secret not in result.stderr + result.stdout
    assert key_id not in result.stderr + result.stdout
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
    output, wrong = tmp_path / "scores", tmp_path / "wrong-token.log"
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
            # The same driver with another token is turned away: authentication is on. One
            # try at the GCS, where Ray would retry for 20 s (a second apart).
            f"echo right-token-exit=$({connect} >/dev/null 2>&1; echo $?)",
            f"echo wrong-token-exit=$(RAY_AUTH_TOKEN={'0' * 64} "
            f"RAY_gcs_server_port_wait_time_s=1 {connect} >'{wrong}' 2>&1; echo $?)",
        ]
    )
    result = run_namespaced(script, ray_tmpdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "right-token-exit=0" in result.stdout
    assert "wrong-token-exit=" in result.stdout
    assert "wrong-token-exit=0" not in result.stdout
    assert "InvalidAuthToken" in wrong.read_text()  # refused for its token, not another reason
    scores = read_scores(output)
    assert scores["node"].nunique() == 2  # both nodes classified
    expected = scored["scores"].set_index("path")
    assert sorted(scores["path"]) == sorted(expected.index)
    for row in scores.to_dict("records"):
        assert row["predicted_class"] == expected.loc[row["path"], "predicted_class"]
        if not row["error"]:
            assert abs(row["confidence"] - expected.loc[row["path"], "confidence"]) < 1e-4


def test_progress_rate_counts_from_the_first_batch_back(monkeypatch, caplog):
    """The images/s a user sizes a cluster by is the rate once the actors run: Ray's and the
    actors' start, paid once, is said apart and not averaged in."""
    from sem_cls import scoring

    clock = iter([0.0, 10.0, 11.0, 12.0, 12.0])  # the start, three batches back, the rate read
    monkeypatch.setattr(scoring.time, "monotonic", lambda: next(clock))
    caplog.set_level("INFO", logger="sem_cls.scoring")
    progress = scoring.Progress(total=96, every_s=0.5)
    for _ in range(3):
        progress.update(32)
    assert progress.rate == pytest.approx(64 / 2)  # not 96 images in 12 s
    shown = caplog.text
    assert "First images back 10.0 s after the job started" in shown
    assert "Scored 96/96 images, 32.0 images/s, 0:00:00 left" in shown


def test_a_file_that_is_no_checkpoint_is_refused_after_ray_started(scored, tmp_path, ray_tmpdir):
    """The model loads while Ray starts: a file that is no checkpoint still stops the run with
    exit code 2 naming it, Ray shut down, and no output folder made."""
    not_a_model = tmp_path / "model.ckpt"
    not_a_model.write_text("not a checkpoint")
    output = tmp_path / "scores"
    result = run_score(tmp_path, ray_tmpdir, not_a_model, scored["archive"], output, timeout=120)
    assert_user_error(result, f"ckpt_path={not_a_model}", "is not a sem-cls checkpoint")
    assert not output.exists()
