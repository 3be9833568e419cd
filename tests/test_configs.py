"""Every config group option and experiment composes and passes its schema, and the models and
data they describe can be built."""

import hydra
import pytest
import torch
from lightning import Trainer

from sem_cls.config.schema import check_config
from sem_cls.data.ingest import ingest_folder
from sem_cls.data.manifest import SplitManifest
from sem_cls.errors import UserError
from sem_cls.runner import build_datamodule
from tests.helpers import ROOT, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides",
    [
        [f"{group}={name}"]
        for group in ("data", "augment", "model", "trainer", "callbacks", "logger", "debug")
        for name in options(group)
    ]
    + [[f"experiment={name}"] for name in options("experiment")]
    + [["hparams_search=optuna"]],
    ids=lambda overrides: overrides[0],
)
def test_every_shipped_config_passes_its_schema(overrides, tmp_path):
    # A value out of range in a shipped YAML would refuse the config for every user.
    check_config(compose_config("train", tmp_path, overrides))


def test_eval_config_passes_its_schema_and_asks_for_the_checkpoint(tmp_path):
    check_config(compose_config("eval", tmp_path, ["ckpt_path=some.ckpt", "data=synthetic"]))
    with pytest.raises(UserError, match="ckpt_path has no value"):
        check_config(compose_config("eval", tmp_path))


def test_a_model_built_from_the_config_saves_a_spec_that_loads_safely(tmp_path):
    # Choices (head, class_weighting) reach the model as plain strings: a checkpoint holding
    # any other type in its spec would not load with weights_only=True.
    overrides = ["model.backbone=test_efficientnet", "model.pretrained=false", "model.head=mlp"]
    cfg = compose_config("train", tmp_path, overrides)
    classifier = hydra.utils.instantiate(cfg.model, class_names=["a", "b"], _convert_="all")
    torch.save(classifier.model.spec, tmp_path / "spec.pt")  # what checkpoints carry
    loaded = torch.load(tmp_path / "spec.pt", weights_only=True)
    assert loaded["head"] == "mlp"


@pytest.mark.parametrize("model", options("model"))
def test_model_configs_instantiate(model, tmp_path):
    # Random weights for models whose ImageNet weights live on the hub, unreachable in tests.
    cfg = compose_config("train", tmp_path, [f"model={model}"])
    pretrained = cfg.model.weights_file is not None
    classifier = hydra.utils.instantiate(
        cfg.model, class_names=["a", "b", "c"], pretrained=pretrained, _convert_="all"
    )
    logits = classifier(torch.zeros(2, *classifier.model.data_config["input_size"]))
    assert logits.shape == (2, 3)


def test_default_training_fits_the_head_on_cached_features(tiny_sem_dir, tmp_path):
    # The default recipe as train.py builds it; a tiny random backbone stands in for InceptionV3.
    overrides = [f"data.data_dir={tiny_sem_dir}", "data.num_workers=0"]
    backbone = ["model.backbone=test_efficientnet", "model.pretrained=false"]
    cfg = compose_config("train", tmp_path, [*overrides, *backbone])
    manifest = SplitManifest.from_config(cfg.data, ingest_folder(cfg.data))
    model = hydra.utils.instantiate(cfg.model, class_names=manifest.class_names, _convert_="all")
    datamodule = build_datamodule(manifest, cfg.data, model.model)
    datamodule.setup("fit")
    features = next(iter(datamodule.train_dataloader()))["features"]
    # Frozen, without augmentation: the backbone's features are extracted once, into the cache.
    assert features.shape[1:] == (model.model.backbone.num_features,)
    assert list((tmp_path / "cache").rglob("*.npy"))


@pytest.mark.parametrize(
    "experiment", [name for name in options("experiment") if name.startswith("nffa_finetune")]
)
def test_fine_tuning_recipes_build_and_take_a_training_step(experiment, tmp_path):
    cfg = compose_config("train", tmp_path, [f"experiment={experiment}"])
    classifier = hydra.utils.instantiate(
        cfg.model, class_names=["a", "b", "c", "d"], pretrained=False, _convert_="all"
    )
    assert not classifier.model.frozen, "a fine-tuning recipe must let the backbone learn"
    classifier.trainer = Trainer(max_epochs=cfg.trainer.max_epochs, logger=False)
    optimizer = classifier.configure_optimizers()["optimizer"]
    classifier.train()
    size = classifier.model.data_config["input_size"]
    batch = {"image": torch.randn(4, *size), "label": torch.tensor([0, 1, 2, 3])}
    classifier.log = lambda *args, **kwargs: None  # outside a fit loop: nowhere to log to
    loss = classifier.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
