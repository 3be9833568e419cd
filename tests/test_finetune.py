"""Fine-tuning: exactly the scheduled stages learn, from the scheduled epoch; augmentation."""

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from sem_cls.data.augment import sem_train_transform
from sem_cls.data.datamodule import SEMDataModule
from sem_cls.models.build import build_classifier
from sem_cls.models.classifier import SEMClassifier
from sem_cls.models.finetune import backbone_stages, warmup_cosine
from sem_cls.runner import build_datamodule
from tests.helpers import compose_config, feature_extractor, split_manifest

# Small inputs keep a ResNet-18 epoch on the tiny set to a second or two.
SMALL = dict(
    input_size=(3, 64, 64), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)  # fmt: skip


def fit(data_dir, epochs: int = 1, callbacks=(), augment=None, **model_args):
    L.seed_everything(0)
    manifest = split_manifest(data_dir)
    datamodule = SEMDataModule(manifest, SMALL, num_workers=0, batch_size=16, augment=augment)
    model = build_classifier(
        manifest.class_names,
        backbone="resnet18",
        pretrained=False,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        **model_args,
    )
    before = {k: v.clone() for k, v in model.model.backbone.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=datamodule)
    after = model.model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return model, changed


def stage_of(model) -> dict[str, int]:
    """Stage index of every backbone parameter and buffer, by its module's name."""
    # From an unfrozen twin: frozen BatchNorms hold their weights as buffers, not parameters.
    stages = backbone_stages(timm.create_model("resnet18", num_classes=0))
    module_stage = {name.rpartition(".")[0]: i for i, stage in enumerate(stages) for name in stage}
    state = model.model.backbone.state_dict()
    return {key: module_stage[key.rpartition(".")[0]] for key in state}


@pytest.mark.slow  # fine-tunes a ResNet-18
def test_last_n_stages_learn_and_the_rest_stay_bitwise_equal(tiny_sem_dir):
    model, changed = fit(tiny_sem_dir, freeze=2)
    stages = stage_of(model)
    last_two = {max(stages.values()) - 1, max(stages.values())}
    learning = {k for k, s in stages.items() if s in last_two}
    assert changed == learning
    stem_bn = model.model.backbone.bn1
    assert isinstance(stem_bn, FrozenBatchNorm2d), "BatchNorm of a frozen stage stays frozen"
    assert isinstance(model.model.backbone.layer4[0].bn1, torch.nn.BatchNorm2d)


@pytest.mark.slow  # fine-tunes a ResNet-18
def test_freeze_none_trains_every_backbone_tensor(tiny_sem_dir):
    model, changed = fit(tiny_sem_dir, freeze="none")
    every = set(model.model.backbone.state_dict())
    assert changed == every


@pytest.mark.slow  # fine-tunes a ResNet-18
def test_unfreezing_after_k_epochs_switches_at_epoch_k(tiny_sem_dir):
    class Watch(L.Callback):
        def __init__(self):
            self.learning, self.snapshots = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # the state the epoch's steps see
                backbone = pl_module.model.backbone
                grads = {p.requires_grad for p in backbone.layer4.parameters()}
                self.learning.append((grads, backbone.training))

        def on_train_epoch_end(self, trainer, pl_module):
            state = pl_module.model.backbone.state_dict()
            self.snapshots.append({k: v.clone() for k, v in state.items()})

    watch = Watch()
    model, changed = fit(tiny_sem_dir, epochs=3, callbacks=[watch], freeze=1, unfreeze_after=2)
    assert watch.learning == [({False}, False), ({False}, False), ({True}, True)]
    first, second, third = watch.snapshots
    assert all(torch.equal(first[k], second[k]) for k in first), "epochs 0-1 train the head only"
    assert any(not torch.equal(second[k], third[k]) for k in second), "epoch 2 trains layer4"
    assert changed and all(k.startswith("layer4") for k in changed)


def test_layer_decay_gives_lower_rates_to_earlier_layers(tiny_sem_dir):
    model = build_classifier(
        split_manifest(tiny_sem_dir).class_names,
        backbone="resnet18",
        pretrained=False,
        freeze="none",
        layer_decay=0.5,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    model.trainer = L.Trainer(max_epochs=1)  # configure_optimizers reads max_epochs
    optimizer = model.configure_optimizers()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    backbone = model.model.backbone
    head, stem, top = model.model.head.weight, backbone.conv1.weight, backbone.layer4[1]
    assert lr_of[id(head)] == 1e-3
    assert lr_of[id(stem)] < lr_of[id(top.conv2.weight)] <= 1e-3


def test_warmup_then_cosine():
    factor = warmup_cosine(warmup_epochs=2, cosine=True, max_epochs=10)
    values = [factor(epoch) for epoch in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(a > b for a, b in zip(values[2:], values[3:], strict=False))
    assert warmup_cosine(0, False, 10)(7) == 1.0


def test_sem_augmentation_gives_varied_views_of_the_same_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128), np.uint8))
    transform = sem_train_transform(SMALL)
    torch.manual_seed(0)
    views = [transform(image.convert("RGB")) for _ in range(4)]
    assert all(view.shape == (3, 64, 64) and view.dtype == torch.float32 for view in views)
    assert not torch.equal(views[0], views[1])


def test_augmented_training_reads_images_while_validation_stays_cached(tiny_sem_dir, tmp_path):
    manifest = split_manifest(tiny_sem_dir)
    model = build_classifier(manifest.class_names, backbone="resnet18", pretrained=False).model
    datamodule = SEMDataModule(
        manifest,
        SMALL,
        feature_extractor(model, tmp_path),
        num_workers=0,
        batch_size=8,
        augment={"scale": (0.8, 1.0)},
    )
    datamodule.setup("fit")
    images = next(iter(datamodule.train_dataloader()))["image"]
    features = next(iter(datamodule.val_dataloader()))["features"]
    assert images.shape[1:] == (3, 64, 64)
    assert features.ndim == 2 and features.shape[1] == model.backbone.num_features


def test_test_time_augmentation_averages_the_eight_symmetric_views():
    model = build_classifier(["a", "b", "c"], backbone="resnet18", pretrained=False).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        averaged = model.tta_logits(images).exp()
        turned = model(torch.rot90(images.flip(-1), 3, (-2, -1))).softmax(1)
        symmetric = images + images.flip(-1)  # unchanged by a horizontal flip
        symmetric = symmetric + symmetric.flip(-2)
        symmetric = symmetric + torch.rot90(symmetric, 1, (-2, -1))
        plain = model(symmetric).softmax(1)
        tta = model.tta_logits(symmetric).exp()
    assert torch.allclose(averaged.sum(1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(averaged, turned, atol=1e-4), "views differ for a generic image"
    assert torch.allclose(tta, plain, atol=1e-5), "all views agree for a symmetric image"


def test_setup_extracts_the_features_before_any_loader_is_asked_for(tiny_sem_dir, tmp_path):
    manifest = split_manifest(tiny_sem_dir)
    model = build_classifier(manifest.class_names, backbone="resnet18", pretrained=False).model
    datamodule = SEMDataModule(manifest, SMALL, feature_extractor(model, tmp_path), num_workers=0)
    datamodule.setup("fit")
    assert set(datamodule.features) == {"train", "val"}
    assert len(list(tmp_path.rglob("*.npy"))) == 2
    batch = next(iter(datamodule.val_dataloader()))
    assert set(batch) == {"features", "label", "index"}


def test_evaluation_with_tta_reads_images_and_averages_the_eight_views(tiny_sem_dir, tmp_path):
    model = build_classifier(["a", "b", "c"], backbone="resnet18", pretrained=False).model
    cfg = compose_config("eval", tmp_path, ["ckpt_path=unused", f"data.data_dir={tiny_sem_dir}"])
    manifest = split_manifest(tiny_sem_dir)
    # Cached features have no flips or turns to average: with TTA the loaders give images.
    assert build_datamodule(manifest, cfg.data, model).feature_extractor is not None
    assert build_datamodule(manifest, cfg.data, model, tta=True).feature_extractor is None
    classifier = SEMClassifier(model, tta=True).eval()
    batch = {"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 2])}
    batch["index"] = torch.arange(2)
    with torch.no_grad():
        logits = classifier.test_step(batch, 0)["logits"]
        assert torch.allclose(logits, classifier.tta_logits(batch["image"]))
