"""Property: whatever bytes a file holds, ingest and prediction raise nothing; every file is
either used or reported with a reason, and good files next to bad ones are still used."""

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sem_cls.data.ingest import ingest

# Fast and the same on every run: a fixed sequence of examples, no example database.
FAST = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORMATS = {  # format: the modes it can hold
    "JPEG": ["L", "RGB"],
    "PNG": ["L", "RGB", "RGBA", "P", "I;16"],
    "TIFF": ["L", "RGB", "RGBA", "P", "I;16"],
}
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif"}


def encoded(image_format: str, mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (24, 32), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, image_format)
    return out.getvalue()


@st.composite
def bad_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes): random bytes, an empty file, a truncated image or a mangled header."""
    image_format = draw(st.sampled_from(sorted(FORMATS)))
    suffix = SUFFIX[image_format]
    kind = draw(st.sampled_from(["random", "empty", "truncated", "header"]))
    if kind == "random":
        return suffix, draw(st.binary(min_size=1, max_size=2048))
    if kind == "empty":
        return suffix, b""
    mode = draw(st.sampled_from(FORMATS[image_format]))
    data = encoded(image_format, mode, draw(st.integers(0, 1000)))
    if kind == "truncated":
        return suffix, data[: draw(st.integers(1, len(data) - 1))]
    start = draw(st.integers(0, 48))
    noise = draw(st.binary(min_size=1, max_size=16))
    return suffix, data[:start] + noise + data[start + len(noise) :]


def folder_with(root: Path, suffix: str, data: bytes) -> tuple[Path, Path]:
    """Two good images and the file under test, all in class folder A."""
    (root / "A").mkdir(parents=True, exist_ok=True)
    for index, image_format in enumerate(("PNG", "JPEG")):
        good = root / "A" / f"good{index}{SUFFIX[image_format]}"
        good.write_bytes(encoded(image_format, "L", index))
    bad = root / "A" / f"bad{suffix}"
    bad.write_bytes(data)
    return root / "A" / "good0.png", bad


@pytest.mark.slow  # 50 examples: about 20 s on an idle machine
@FAST
@given(case=bad_files())
def test_ingest_uses_or_reports_every_file(tmp_path_factory, case):
    root = tmp_path_factory.mktemp("sem")
    good, bad = folder_with(root, *case)
    result = ingest(root, workers=1, progress=False)
    used = {r["path"] for r in result.images}
    reported = {r["path"]: r["error"] for r in result.rejected}
    assert {"A/good0.png", "A/good1.jpg"} <= used
    assert used | set(reported) == {"A/good0.png", "A/good1.jpg", f"A/{bad.name}"}
    assert all(reported.values()), "a file left out names why"


@pytest.fixture(scope="module")
def tiny_model():
    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.models.model import SEMModel
    from sem_cls.predictor import Predictor

    model = SEMModel.from_spec({"class_names": ["A", "B"], "backbone": "test_efficientnet"})
    return Predictor(model, PredictorSettings(top_k=1, bf16=False, num_workers=0, device="cpu"))


@pytest.mark.slow  # 50 examples: about 20 s on an idle machine
@FAST
@given(case=bad_files())
def test_prediction_classifies_or_reports_every_file(tmp_path_factory, tiny_model, case):
    root = tmp_path_factory.mktemp("inputs")
    good, bad = folder_with(root, *case)
    probs, _, errors = tiny_model.scores([good, bad])
    assert errors[0] == "" and np.isfinite(probs[0]).all()
    assert bool(errors[1]) == bool(np.isnan(probs[1]).all()), "unreadable rows are NaN and named"
    if not errors[1]:
        assert np.isfinite(probs[1]).all()
