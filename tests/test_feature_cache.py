"""The feature cache: the same head as without it, never stale, safe to kill, bf16 near fp32."""

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import lightning as L
import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from sem_cls.data.datamodule import SEMDataModule
from sem_cls.data.features import FeatureCache
from sem_cls.errors import UserError
from sem_cls.models.build import build_classifier, build_model
from sem_cls.models.classifier import SEMClassifier
from sem_cls.models.engines import TorchEngine, native_bf16
from sem_cls.runner import build_datamodule
from tests.helpers import (
    LITE0,
    ROOT,
    Images,
    cached,
    compose_config,
    feature_extractor,
    split_manifest,
    tiny_backbone,
)


def train_head(data_dir, cache_dir, cache: bool) -> tuple[SEMClassifier, SEMDataModule]:
    L.seed_everything(0)
    manifest = split_manifest(data_dir)
    model = build_classifier(
        manifest.class_names, **LITE0, optimizer=lambda params: torch.optim.Adam(params, 1e-2)
    )
    extractor = feature_extractor(model.model, cache_dir, bf16=False) if cache else None
    datamodule = SEMDataModule(
        manifest, model.model.data_config, extractor, num_workers=0, batch_size=16
    )
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule


@pytest.mark.slow  # two Lite0 trainings
def test_cached_and_uncached_training_give_the_same_head(tiny_sem_dir, tmp_path):
    cached, datamodule = train_head(tiny_sem_dir, tmp_path, cache=True)
    assert set(datamodule.features) == {"train", "val"}
    assert len(list(tmp_path.rglob("*.npy"))) == 2
    uncached, datamodule = train_head(tiny_sem_dir, tmp_path, cache=False)
    assert not datamodule.features
    cached, uncached = cached.model.head, uncached.model.head
    torch.testing.assert_close(cached.weight, uncached.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.bias, uncached.bias, atol=1e-5, rtol=1e-4)


def test_cache_hits_only_when_nothing_that_changes_features_changed(tmp_path):
    cache = FeatureCache(tmp_path)
    backbone = tiny_backbone()
    first = cached(cache, backbone)
    assert first.shape == (6, backbone.num_features)
    assert isinstance(first, np.memmap)

    def entries():
        return len(list(tmp_path.rglob("*.npy")))

    cached(cache, backbone)
    assert entries() == 1, "the same backbone, preprocessing and images must hit"

    cached(cache, timm.create_model("test_resnet", num_classes=0).eval())
    assert entries() == 2, "another architecture"
    retrained = tiny_backbone()
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    cached(cache, retrained)
    assert entries() == 3, "other weights"
    cached(cache, backbone, preprocessing="q")
    assert entries() == 4, "other preprocessing"
    cached(cache, backbone, digests=("a", "b", "c", "d", "e", "changed"))
    assert entries() == 5, "other image content"


def test_failed_extraction_leaves_no_entry_and_the_next_run_completes(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(OSError, match="disk went away"):
        cached(cache, tiny_backbone(), fail_at=4)
    assert not list(tmp_path.rglob("*.npy"))
    features = cached(cache, tiny_backbone())
    assert np.isfinite(features).all() and np.abs(features).sum(axis=1).min() > 0


@pytest.mark.slow  # a child process killed mid-way
def test_extraction_killed_halfway_leaves_the_cache_usable(tmp_path):
    # A child extracts slowly and is SIGKILLed mid-way: no cleanup code runs.
    child = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(ROOT)!r})
        from sem_cls.data.features import FeatureCache
        from tests.helpers import Images, cached, tiny_backbone

        class Slow(Images):
            def __getitem__(self, index):
                time.sleep(0.5)
                return super().__getitem__(index)

        import tests.helpers as helpers
        helpers.Images = Slow  # what cached() builds
        cached(FeatureCache({str(tmp_path)!r}), tiny_backbone())
    """)
    process = subprocess.Popen([sys.executable, "-c", child], env={**os.environ})
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("*.partial-*.npy")):
        assert process.poll() is None, "the child ended before it started writing"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not [p for p in tmp_path.rglob("*.npy") if ".partial-" not in p.name]

    features = cached(FeatureCache(tmp_path), tiny_backbone())
    reference = tiny_backbone()(Images().images).detach().numpy()
    np.testing.assert_allclose(features, reference, atol=1e-5)


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    predicted = cross_val_predict(LogisticRegression(max_iter=3000), features, labels, cv=folds)
    return float((predicted == labels).mean())


@pytest.mark.slow  # Lite0 features, twice
@pytest.mark.skipif(
    not native_bf16(torch.device("cpu")), reason="this CPU has no native bf16: features are fp32"
)
def test_bf16_features_stay_close_to_fp32(tiny_sem_dir, tmp_path):
    manifest = split_manifest(tiny_sem_dir, ratios=(0.5, 0.25, 0.25))
    model, _ = build_model(manifest.class_names, **LITE0)
    datamodule = SEMDataModule(manifest, model.data_config, num_workers=0)
    datamodule.setup()
    samples = [s for split in datamodule.samples.values() for s in split]
    labels = np.array([s.label for s in samples])
    accuracy, features = {}, {}
    for bf16 in (False, True):
        features[bf16] = FeatureCache(tmp_path).features(
            TorchEngine(model.backbone, model.data_config, bf16),
            {},
            datamodule.image_dataset(samples),
            [s.sha256 for s in samples],
            16,
            0,
        )
        accuracy[bf16] = linear_probe_accuracy(np.asarray(features[bf16]), labels)
    print(f"linear probe accuracy: fp32 {accuracy[False]:.4f}, bf16 {accuracy[True]:.4f}")
    fp32, bf16 = (torch.from_numpy(np.array(features[key])) for key in (False, True))
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
    # One image of the 80 may flip; more would mean bf16 loses information the head uses.
    assert abs(accuracy[True] - accuracy[False]) <= 1 / len(labels) + 1e-9


def test_fine_tuning_bypasses_the_cache(tiny_sem_dir, tmp_path):
    overrides = [f"data.data_dir={tiny_sem_dir}", "data.num_workers=0"]
    cfg = compose_config("train", tmp_path, overrides)
    manifest = split_manifest(tiny_sem_dir)
    model, _ = build_model(manifest.class_names, **LITE0, freeze="none")
    datamodule = build_datamodule(manifest, cfg.data, model)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].ndim == 4, "a backbone that learns needs images, not cached features"
    assert not list(tmp_path.rglob("*.npy"))


def reference_features() -> np.ndarray:
    return tiny_backbone()(Images().images).detach().numpy()


def only_entry(cache_dir) -> "os.PathLike":
    (entry,) = [p for p in cache_dir.rglob("*.npy") if ".partial-" not in p.name]
    return entry


def test_a_tampered_entry_is_discarded_with_a_warning_and_extracted_again(tmp_path, caplog):
    cached(FeatureCache(tmp_path), tiny_backbone())
    entry = only_entry(tmp_path)
    matrix = np.load(entry, mmap_mode="r+")
    matrix[:3] = 0  # half the rows zeroed: same shape, same dtype, wrong content
    matrix.flush()
    del matrix
    features = cached(FeatureCache(tmp_path), tiny_backbone())
    assert str(entry) in caplog.text and "does not match its checksum" in caplog.text
    np.testing.assert_allclose(features, reference_features(), atol=1e-5)


def write_npy_with_sidecar(entry, array, allow_pickle=False):
    """A .npy file and a sidecar that describes it truthfully: only its content is wrong."""
    with entry.open("wb") as f:
        np.lib.format.write_array(f, array, allow_pickle=allow_pickle)
    sha256 = hashlib.sha256(entry.read_bytes()).hexdigest()
    sidecar = {"sha256": sha256, "shape": list(array.shape), "dtype": array.dtype.str}
    entry.with_suffix(".json").write_text(json.dumps(sidecar))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda e: e.write_bytes(os.urandom(4096)), "does not match its checksum"),
        (lambda e: e.write_bytes(b""), "does not match its checksum"),
        (lambda e: e.with_suffix(".json").unlink(), "no checksum file"),
        (lambda e: e.with_suffix(".json").write_text("{not json"), "checksum file is unreadable"),
        (
            lambda e: write_npy_with_sidecar(e, np.array([{"a": 1}] * 6, dtype=object), True),
            "not a readable feature matrix",
        ),
        (
            lambda e: write_npy_with_sidecar(e, np.zeros((6, 3), np.float32)),
            "not float32",
        ),
        (
            lambda e: write_npy_with_sidecar(e, np.zeros((6, 1280), np.float64)),
            "not float32",
        ),
    ],
    ids=["garbage", "empty", "no-sidecar", "bad-sidecar", "pickled", "shape", "dtype"],
)
def test_an_unusable_entry_is_never_read_and_never_a_numpy_traceback(
    tmp_path, caplog, damage, reason
):
    cached(FeatureCache(tmp_path), tiny_backbone())
    entry = only_entry(tmp_path)
    damage(entry)
    features = cached(FeatureCache(tmp_path), tiny_backbone())
    assert f"{entry}" in caplog.text and reason in caplog.text
    np.testing.assert_allclose(features, reference_features(), atol=1e-5)
    # Repaired: the next read is a hit that verifies.
    caplog.clear()
    caplog.set_level(logging.INFO, logger="sem_cls.data.features")
    cached(FeatureCache(tmp_path), tiny_backbone())
    assert "discarded" not in caplog.text and "Feature cache hit" in caplog.text


def test_a_cache_that_cannot_be_repaired_is_a_user_error_naming_the_path(tmp_path):
    cached(FeatureCache(tmp_path), tiny_backbone())
    entry = only_entry(tmp_path)
    entry.unlink()
    entry.mkdir()  # a folder where the entry file belongs
    with pytest.raises(UserError, match=f"rm -r {entry}"):
        cached(FeatureCache(tmp_path), tiny_backbone())

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a user's file")
    with pytest.raises(UserError, match="data.cache_dir"):
        cached(FeatureCache(not_a_folder), tiny_backbone())
    assert not_a_folder.read_text() == "a user's file"


def test_partials_of_killed_extractions_are_removed_and_only_those(tmp_path):
    cache = FeatureCache(tmp_path)
    cached(cache, tiny_backbone())
    entry = only_entry(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    stale = [
        entry.with_name(f"{'0' * 24}.partial-{gone.pid}@{host}.npy"),
        entry.with_name(f"{'1' * 24}.partial-{gone.pid}@{host}.shard-1-of-2.npy"),
    ]
    kept = [
        entry.with_name(f"{'2' * 24}.partial-{os.getpid()}@{host}.npy"),  # a live extraction
        entry.with_name(f"{'3' * 24}.partial-{gone.pid}@elsewhere.npy"),  # another host's
        entry.with_name(f"notes.partial-{gone.pid}@{host}.npy"),  # not the project's name
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    cached(cache, tiny_backbone(), digests="abcdeg")  # a miss: an extraction starts
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
