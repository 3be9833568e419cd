"""Build the LightningModule that trains an SEMModel from the `model` config."""

import torch
from torch import nn

from sem_cls.models.classifier import SEMClassifier
from sem_cls.models.model import build_model

# InceptionV3's auxiliary classifier sees 768 pooled features (its Mixed_6e output).
AUX_FEATURES = 768


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
