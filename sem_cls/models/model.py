"""SEMModel: the trained classifier as one object, a plain nn.Module with no training code.

Backbone -> head -> temperature-scaled probabilities, and the novelty references of a frozen
backbone. Its `spec` holds the little needed to rebuild it (class names, backbone name, head
shape, input config, info-bar setting); training, prediction, serving and the page all use it.
"""

import torch
from torch import nn

from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.samples import normalised
from sem_cls.models import finetune, novelty


class SEMModel(nn.Module):
    """(B, 3, H, W) images -> (B, num_classes) logits; `probabilities` calibrates them.

    Buffers (saved with the weights): `temperature` divides the logits (fitted on validation
    predictions); `novelty_references` (M, num_features) float16 and `novelty_threshold` flag
    images unlike the training images (none for a backbone that learned).
    """

    def __init__(self, backbone: nn.Module | None, head: nn.Module, spec: dict):
        super().__init__()
        # None: a frozen backbone that runs converted (sem_cls.models.engines), never as a module.
        self.backbone = backbone
        self.head = head
        # class_names, backbone, head, head_hidden, head_dropout, data_config, info_bar, frozen,
        # num_features
        self.spec = dict(spec)
        num_features = backbone.num_features if backbone is not None else spec["num_features"]
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("novelty_references", torch.zeros(0, num_features).half())
        self.register_buffer("novelty_threshold", torch.tensor(float("nan")))

    @classmethod
    def from_spec(cls, spec: dict, with_backbone: bool = True) -> "SEMModel":
        """A model of `spec`'s shape (as build_model made it: frozen BatchNorms of a partly
        frozen backbone included) with random weights, to load a state dict into; timm fetches
        no weights. Fills in what an earlier spec lacks (freeze: all). Without the backbone
        (a frozen one that runs converted) it is the head and buffers only, and needs no timm."""
        if not with_backbone:
            head = finetune.make_head(
                spec.get("head", "linear"), spec["num_features"], len(spec["class_names"]),
                spec.get("head_hidden", 512), spec.get("head_dropout", 0.0),
            )  # fmt: skip
            return cls(None, head, spec)
        keys = ("backbone", "head", "head_hidden", "head_dropout", "aux_logits", "freeze")
        options = {key: spec[key] for key in keys if key in spec}
        model, _ = build_model(spec["class_names"], pretrained=False, **options)
        model.spec = {**model.spec, **spec}
        return model

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    @property
    def frozen(self) -> bool:
        """True for a backbone that never learned: its features can be cached and compared."""
        return bool(self.spec.get("frozen", True))

    @property
    def data_config(self) -> dict:
        """Input size, mean/std, interpolation and crop the backbone was trained with."""
        return dict(self.spec["data_config"])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 pixels or normalised (B, 3, H, W) -> (B, num_features) pooled
        backbone features."""
        if self.backbone is None:
            raise RuntimeError("This model was loaded without its backbone: use its engine.")
        config = self.spec["data_config"]
        images = normalised(images, config["mean"], config["std"])  # -> (B, 3, H, W)
        features = self.backbone(images.contiguous(memory_format=torch.channels_last))
        return features[0] if isinstance(features, tuple) else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_features) -> (B, num_classes)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled class probabilities: (B, num_classes) -> (B, num_classes)."""
        return (logits.float() / self.temperature).softmax(dim=1)

    @property
    def has_novelty(self) -> bool:
        return len(self.novelty_references) > 0 and not self.novelty_threshold.isnan()

    def novelty(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B,) cosine distance to the nearest training image; NaN without
        references."""
        if not self.has_novelty:
            return features.new_full((len(features),), float("nan"), dtype=torch.float32)
        return novelty.novelty_scores(features, self.novelty_references)


def _backbone(name: str, pretrained: bool, weights_file: str | None, aux_logits: bool):
    from sem_cls.models import backbones  # here: timm's import is a second torch's

    extra = {"aux_logits": True} if aux_logits else {}
    backbone = backbones.create_backbone(name, pretrained, weights_file, **extra)
    if aux_logits:
        backbone.AuxLogits.fc = nn.Identity()  # its pooled features; our aux head classifies
    # channels_last: about 1.5x faster convolutions on CPU (oneDNN) and on tensor-core GPUs.
    return backbone.to(memory_format=torch.channels_last)


def _freeze(backbone: nn.Module, freeze) -> list[str]:
    """Freeze the backbone as `freeze` says; the names of the parameters that may learn."""
    from sem_cls.models import backbones

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
    from timm.data import resolve_model_data_config

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
        "num_features": module.num_features,
    }
    head_module = finetune.make_head(
        head, module.num_features, len(class_names), head_hidden, head_dropout
    )
    return SEMModel(module, head_module, spec), learning_names
