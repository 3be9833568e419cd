"""Build the trained model (SEMModel) from the `model` config, and the LightningModule that
trains it; rebuild a SEMModel from a checkpoint's spec and weights."""

import torch
from timm.data import resolve_model_data_config
from torch import nn

from sem_cls.data.infobar import InfoBarCrop
from sem_cls.errors import UserError
from sem_cls.models import backbones, finetune
from sem_cls.models.classifier import SEMClassifier
from sem_cls.models.model import SEMModel

# InceptionV3's auxiliary classifier sees 768 pooled features (its Mixed_6e output).
AUX_FEATURES = 768


def _backbone(name: str, pretrained: bool, weights_file: str | None, aux_logits: bool):
    extra = {"aux_logits": True} if aux_logits else {}
    backbone = backbones.create_backbone(name, pretrained, weights_file, **extra)
    if aux_logits:
        backbone.AuxLogits.fc = nn.Identity()  # its pooled features; our aux head classifies
    # channels_last: about 1.5x faster convolutions on CPU (oneDNN) and on tensor-core GPUs.
    return backbone.to(memory_format=torch.channels_last)


def _freeze(backbone: nn.Module, freeze) -> list[str]:
    """Freeze the backbone as `freeze` says; the names of the parameters that may learn."""
    stages = finetune.backbone_stages(backbone)
    learning = finetune.trainable_stage_count(freeze, len(stages))
    if learning == 0:
        backbones.freeze(backbone)
        return []
    return finetune.freeze_stages(backbone, stages, learning)


def build_model(
    class_names: list[str],
    backbone: str = "inception_v3",
    pretrained: bool = True,
    weights_file: str | None = None,
    freeze: bool | str | int = "all",
    head: str = "linear",
    head_hidden: int = 512,
    head_dropout: float = 0.0,
    aux_logits: bool = False,
    info_bar="auto",
) -> tuple[SEMModel, list[str]]:
    """The SEMModel of a model config, and the backbone parameters its fine-tuning schedule
    trains (none for a frozen backbone, which is then frozen for good)."""
    module = _backbone(backbone, pretrained, weights_file, aux_logits)
    learning_names = _freeze(module, freeze)
    spec = {
        "class_names": list(class_names),
        "backbone": backbone,
        "head": head,
        "head_hidden": head_hidden,
        "head_dropout": head_dropout,
        "aux_logits": bool(aux_logits),
        "data_config": resolve_model_data_config(module),
        "info_bar": InfoBarCrop(info_bar).mode,
        "freeze": freeze,  # rebuilds the same modules (frozen BatchNorms) from a checkpoint
        "frozen": not learning_names,
    }
    head_module = finetune.make_head(
        head, module.num_features, len(class_names), head_hidden, head_dropout
    )
    return SEMModel(module, head_module, spec), learning_names


def balanced_class_weights(train_counts) -> torch.Tensor:
    """sklearn's "balanced": n_images / (n_classes * class_count), so rare classes weigh more."""
    counts = torch.as_tensor(train_counts, dtype=torch.float32)
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def build_classifier(
    class_names: list[str],
    train_counts=None,
    info_bar="auto",
    backbone: str = "inception_v3",
    pretrained: bool = True,
    weights_file: str | None = None,
    freeze: bool | str | int = "all",
    unfreeze_after: int = 0,
    layer_decay: float | None = None,
    warmup_epochs: int = 0,
    cosine_decay: bool = False,
    head: str = "linear",
    head_hidden: int = 512,
    head_dropout: float = 0.0,
    aux_logits: bool = False,
    mixup: dict | None = None,
    compile: bool = False,
    class_weighting: str = "none",
    label_smoothing: float = 0.0,
    optimizer=None,
    novelty_val_share: float | None = 0.05,
) -> SEMClassifier:
    """The `model` config's keys -> a SEMClassifier around a new SEMModel. `train_counts`
    (images per class of the training split) weigh the loss with class_weighting=balanced."""
    model, learning_names = build_model(
        class_names, backbone, pretrained, weights_file, freeze, head, head_hidden,
        head_dropout, aux_logits, info_bar,
    )  # fmt: skip
    if compile and not model.frozen:
        # Where the backbone runs every batch (a frozen one runs once per image, for the cache).
        # In place: the state dict keeps its names.
        model.backbone.compile()
    weights = None
    if class_weighting == "balanced":
        if train_counts is None:
            raise ValueError("class_weighting=balanced needs the training split's class counts.")
        weights = balanced_class_weights(train_counts)
    elif class_weighting != "none":  # the config schema admits none | balanced only
        raise ValueError(f"class_weighting={class_weighting!r} is not 'none' or 'balanced'.")
    aux_head = nn.Linear(AUX_FEATURES, len(class_names)) if aux_logits else None
    return SEMClassifier(
        model,
        optimizer=optimizer,
        learning_names=learning_names,
        unfreeze_after=unfreeze_after,
        layer_decay=layer_decay,
        warmup_epochs=warmup_epochs,
        cosine_decay=cosine_decay,
        class_weights=weights,
        label_smoothing=label_smoothing,
        aux_head=aux_head,
        mixup=mixup,
        novelty_val_share=novelty_val_share,
    )


def model_from_checkpoint(checkpoint: dict) -> SEMModel:
    """The SEMModel a training checkpoint holds: rebuilt from `checkpoint["sem_model"]` (no
    pretrained weights fetched), then its `model.*` weights and buffers loaded."""
    spec = checkpoint.get("sem_model")
    if not isinstance(spec, dict):
        raise UserError("This checkpoint has no sem_model spec: it was not written by train.py.")
    module = _backbone(spec["backbone"], False, None, spec.get("aux_logits", False))
    _freeze(module, spec["freeze"])
    head = finetune.make_head(
        spec["head"], module.num_features, len(spec["class_names"]), spec["head_hidden"],
        spec["head_dropout"],
    )  # fmt: skip
    model = SEMModel(module, head, spec)
    state = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    # The references' row count is the checkpoint's, not the empty buffer's.
    model.novelty_references = torch.empty_like(state["novelty_references"])
    model.load_state_dict(state)
    return model.eval()
