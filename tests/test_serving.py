"""`make serve-model`: the MLflow scoring server on a trained model answers a real SEM image with
its class, and a payload that is no image with an error row."""

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import ROOT

SEM_REAL = ROOT.parent / "shared" / "data" / "sem-real"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def images_payload(*images: bytes) -> dict:
    """The scoring server's JSON: the signature's `image` column, bytes as base64 text."""
    rows = [[base64.b64encode(image).decode()] for image in images]
    return {"dataframe_split": {"columns": ["image"], "data": rows}}


@pytest.fixture(scope="module")
def served_model(trained_run):
    cfg, _, _, run = trained_run
    port = free_port()
    # -o: the venv counts as up to date here; CI's `make test` has just built it.
    server = subprocess.Popen(
        ["make", "-o", ".venv/.installed-requirements", "serve-model",
         f"MODEL=runs:/{run.info.run_id}/model", f"PORT={port}"],
        cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": cfg.logger.mlflow.tracking_uri},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"the server stopped: {server.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        else:
            pytest.fail("the server did not answer /ping within 300 s")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not SEM_REAL.is_dir(), reason="no real SEM images in ../shared/data/sem-real")
def test_served_model_classifies_a_real_sem_image_and_reports_garbage(tiny_sem_dir, served_model):
    classes = {folder.name for folder in tiny_sem_dir.iterdir() if folder.is_dir()}
    image = sorted(p for p in SEM_REAL.rglob("*") if p.suffix.lower() in {".jpg", ".png"})[0]
    answer = post(f"{served_model}/invocations", images_payload(image.read_bytes(), b"garbage"))
    real, garbage = answer["predictions"]
    assert real["error"] == ""
    assert real["predicted_class"] in classes | {"unknown"}
    assert 0 < real["confidence"] <= 1 and real["novelty"] >= 0
    assert sum(real[f"prob_{name}"] for name in classes) == pytest.approx(1, abs=1e-5)
    assert garbage["error"] and garbage["predicted_class"] == ""
