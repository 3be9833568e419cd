"""`make serve-model`: the MLflow scoring server on a trained model answers a real SEM image with
its class, a payload that is no image with an error row (plain JSON: null, never NaN), an empty
request with an empty answer, and a bad param with a 400 that names it."""

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


def post_raw(url: str, payload: dict) -> tuple[int, str]:
    """Status and body text of a POST, whatever the status."""
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def post(url: str, payload: dict) -> dict:
    status, body = post_raw(url, payload)
    assert status == 200, body[-2000:]
    return json.loads(body)


def images_payload(*images: bytes, params: dict | None = None) -> dict:
    """The scoring server's JSON: the signature's `image` column, bytes as base64 text."""
    rows = [[base64.b64encode(image).decode()] for image in images]
    payload = {"dataframe_split": {"columns": ["image"], "data": rows}}
    return {**payload, "params": params} if params else payload


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
    assert garbage["confidence"] is None and garbage["novelty"] is None


@pytest.mark.slow
def test_served_model_answers_json_an_empty_request_and_refuses_bad_params(
    tiny_sem_dir, served_model
):
    url = f"{served_model}/invocations"
    image = sorted(tiny_sem_dir.glob("*/*.jpg"))[0].read_bytes()
    # Missing numbers are JSON null: a strict parser reads the body (NaN is not JSON).
    status, body = post_raw(url, images_payload(image, b"garbage", params={"top_k": 2}))
    assert status == 200, body[-2000:]
    assert "NaN" not in body
    strict = json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in {body}"))
    real, garbage = strict["predictions"]
    assert garbage["confidence"] is None and garbage["prob_Fibres"] is None
    assert real["top2_class"] and "top3_class" not in real
    # An empty request is an empty answer, not a stack trace.
    assert post(url, images_payload()) == {"predictions": []}
    # A value out of range is the client's error, and the answer says which and why.
    for params, phrase in [({"min_confidence": 7}, "min_confidence=7"), ({"top_k": 0}, "top_k=0"),
                           ({"top_k": 11}, "the model knows 10 classes")]:  # fmt: skip
        status, body = post_raw(url, images_payload(image, params=params))
        assert status == 400, body[-2000:]
        assert phrase in json.loads(body)["message"]
