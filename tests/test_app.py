"""The demo page (python -m sem_cls.app) as a user meets it: served from a trained model, driven
in headless Chromium, called through gradio_client, and never reaching past 127.0.0.1."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import (
    ROOT,
    assert_user_error,
    best_checkpoint,
    compose_config,
    run_in_process,
)

CHROMIUM = Path("/usr/bin/chromium")
# Without the networking flags Chromium waits on services it cannot reach on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The picture of the page in the docs; a run with UPDATE_SCREENSHOT=1 replaces it.
SCREENSHOT = ROOT / "docs" / "images" / "app.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nanowires(real_sem_dir) -> Path:
    return next((real_sem_dir / "Nanowires").glob("*.jpg"))


@pytest.fixture(scope="module")
def page_url(trained_run, tmp_path_factory):
    """The page of the tiny trained model, served by `python -m sem_cls.app` on a free port."""
    work = tmp_path_factory.mktemp("app")
    port = free_port()
    log = (work / "app.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sem_cls.app",
            f"ckpt_path={best_checkpoint(trained_run[0])}",
            f"port={port}",
            f"paths.log_dir={work / 'logs'}",
            f"paths.mlruns_dir={work / 'mlruns'}",
            f"paths.cache_dir={work / 'cache'}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (work / "app.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, (work / "app.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def expected(trained_run, nanowires):
    """The class predict's Predictor gives the Nanowires image, in this process."""
    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.predictor import Predictor

    # min_confidence=0.5, the page's default
    settings = PredictorSettings(min_confidence=0.5, num_workers=0)
    checkpoint, engines = best_checkpoint(trained_run[0]), trained_run[0].paths.engine_dir
    (row,) = Predictor.load(checkpoint, settings, cache_dir=engines).predict([nanowires])
    assert row["error"] == ""
    return row["predicted_class"], row["top_k"][0][0], row["predicted_class"] == "uncertain"


@pytest.mark.slow
def test_the_page_classifies_a_dropped_sem_image_and_stays_on_this_machine(
    page_url, nanowires, expected, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 900},
        )
        # Every request of the browser context (pages, workers), and any websocket.
        browser.on("request", lambda request: requests.append(request.url))
        page = browser.new_page()
        page.on("websocket", lambda socket: requests.append(socket.url))
        page.goto(page_url)
        page.locator("#images input[type=file]").set_input_files(str(nanowires))
        # The table's rows as a reader (and a screen reader) meets them: ARIA rows and cells.
        row = page.locator("#predictions").get_by_role("row").filter(has_text=nanowires.name)
        expect(row).to_have_count(1, timeout=60_000)
        cells = row.get_by_role("gridcell").all_inner_texts()
        # The gallery shows the image as seen and its Grad-CAM overlay.
        expect(page.get_by_text(f"Grad-CAM: {expected[1]}").first).to_be_attached(timeout=30_000)
        expect(page.locator("#seen img").filter(visible=True)).to_have_count(2, timeout=30_000)
        page.wait_for_load_state("networkidle")
        shot = page.screenshot(full_page=True)
        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.write_bytes(shot)
        browser.close()

    decision, top_class, below_min_confidence = expected
    name, shown, _, top_classes, uncertain = (cell.strip() for cell in cells[:5])
    assert (name, shown) == (nanowires.name, decision), cells
    assert top_classes.startswith(f"{top_class} "), cells
    assert uncertain == str(below_min_confidence).lower(), cells
    outside = [url for url in requests if urlparse(url).hostname != "127.0.0.1"]
    assert requests and not outside, outside


@pytest.mark.slow
def test_the_classify_endpoint_answers_gradio_client(page_url, nanowires, expected, tmp_path):
    from gradio_client import Client, handle_file

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    copy = tmp_path / nanowires.name
    shutil.copyfile(nanowires, copy)
    client = Client(page_url, verbose=False)
    results, gallery = client.predict(
        [handle_file(str(copy)), handle_file(str(broken))], api_name="/classify"
    )

    decision, top_class, _ = expected
    rows = {row[0]: dict(zip(results["headers"], row, strict=True)) for row in results["data"]}
    assert rows[nanowires.name]["class"] == decision
    top = rows[nanowires.name]["top classes"].split(", ")
    assert len(top) == 3 and top[0].split()[0] == top_class
    assert rows[nanowires.name]["error"] == ""
    # A file that is no image is reported in its own row; the other is classified all the same.
    assert rows["broken.png"]["class"] == "" and rows["broken.png"]["error"]
    assert len(gallery) == 2  # the readable image as seen, and its Grad-CAM overlay
    assert nanowires.read_bytes() == copy.read_bytes()  # the user's file is left as it was


def test_a_missing_model_is_a_user_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sem_cls.app",
            f"ckpt_path={tmp_path / 'none.ckpt'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(result, "none.ckpt")


@pytest.mark.slow
def test_images_past_the_novelty_threshold_are_flagged_unknown(trained_run, nanowires, tmp_path):
    """With novelty scores and a threshold on the model, an image scored above it is `unknown`;
    one below keeps its class."""
    import numpy as np

    import sem_cls.app as app

    cfg = compose_config("app", tmp_path, [f"ckpt_path={best_checkpoint(trained_run[0])}"])
    classifier = app.DemoClassifier(cfg)
    assert classifier.model.has_novelty  # the frozen tiny model keeps its training features
    predictor = classifier.predictor
    # Its decision without novelty: what a score below the threshold leaves.
    without_novelty = predictor.with_options(novelty=False)
    expected = predictor.predict([nanowires], without_novelty)[0]["predicted_class"]
    scores = predictor.scores

    def scored(files, *args, **kwargs):  # the real probabilities, novelty scores of our choosing
        probs, _, errors = scores(files, *args, **kwargs)
        return probs, np.array([0.9, 0.1]), errors

    predictor.scores = scored
    classifier.model.novelty_threshold.fill_(0.5)
    rows = classifier.classify([nanowires, nanowires])
    assert [(row.decision, row.unknown) for row in rows] == [("unknown", True), (expected, False)]
    assert [row.novelty for row in rows] == [0.9, 0.1]


def test_another_address_needs_a_login(tmp_path, monkeypatch):
    """Served beyond this machine without SEM_CLS_APP_USER/PASSWORD the page refuses, before
    the model is even looked at."""
    monkeypatch.delenv("SEM_CLS_APP_USER", raising=False)
    monkeypatch.delenv("SEM_CLS_APP_PASSWORD", raising=False)
    result = run_in_process(
        "sem_cls.app", f"ckpt_path={tmp_path / 'none.ckpt'}", "host=0.0.0.0", tmp_path=tmp_path
    )
    assert_user_error(result, "host=0.0.0.0", "SEM_CLS_APP_USER", "SEM_CLS_APP_PASSWORD")


@pytest.mark.slow
def test_a_page_on_another_address_asks_for_the_login(trained_run, nanowires, tmp_path):
    from gradio_client import Client, handle_file

    port = free_port()
    login = {"SEM_CLS_APP_USER": "alice", "SEM_CLS_APP_PASSWORD": "s3cret-enough"}
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "sem_cls.app", f"ckpt_path={best_checkpoint(trained_run[0])}",
         "host=0.0.0.0", f"port={port}", f"paths.log_dir={tmp_path / 'logs'}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **login},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()[-3000:]
                time.sleep(0.5)
        with pytest.raises(Exception, match="(?i)login|auth"):
            Client(url, verbose=False)
        client = Client(url, auth=("alice", "s3cret-enough"), verbose=False)
        results, _ = client.predict([handle_file(str(nanowires))], api_name="/classify")
        assert results["data"][0][0] == nanowires.name
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
