"""SEMModel: the trained classifier as one object, a plain nn.Module with no training code.

Backbone -> head -> temperature-scaled probabilities, and the novelty references of a frozen
backbone. Its `spec` holds the little needed to rebuild it (class names, backbone name, head
shape, input config, info-bar setting); training, prediction, serving and the page all use it.
"""

import torch
from torch import nn

from sem_cls.models import novelty


class SEMModel(nn.Module):
    """(B, 3, H, W) images -> (B, num_classes) logits; `probabilities` calibrates them.

    Buffers (saved with the weights): `temperature` divides the logits (fitted on validation
    predictions); `novelty_references` (M, num_features) float16 and `novelty_threshold` flag
    images unlike the training images (none for a backbone that learned).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # class_names, backbone, head, head_hidden, head_dropout, data_config, info_bar, frozen
        self.spec = dict(spec)
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("novelty_references", torch.zeros(0, backbone.num_features).half())
        self.register_buffer("novelty_threshold", torch.tensor(float("nan")))

    @classmethod
    def from_spec(cls, spec: dict) -> "SEMModel":
        """A model of `spec`'s shape with random weights, to load a state dict into (timm builds
        the backbone without fetching any). Fills in what an earlier spec lacks: `frozen` from
        `freeze` (default: all), `data_config` from the backbone."""
        from sem_cls.models import backbones, finetune

        spec = dict(spec)
        extra = {"aux_logits": True} if spec.get("aux_logits") else {}
        backbone = backbones.create_backbone(spec["backbone"], pretrained=False, **extra)
        if spec.get("aux_logits"):
            backbone.AuxLogits.fc = nn.Identity()  # as in training: its own head took the logits
        backbone = backbone.to(memory_format=torch.channels_last)
        if "frozen" not in spec:
            stages = finetune.backbone_stages(backbone)
            learning = finetune.trainable_stage_count(spec.get("freeze", True), len(stages))
            spec["frozen"] = learning == 0
        if "data_config" not in spec:
            from timm.data import resolve_model_data_config

            spec["data_config"] = resolve_model_data_config(backbone)
        head = finetune.make_head(
            spec.get("head", "linear"),
            backbone.num_features,
            len(spec["class_names"]),
            spec.get("head_hidden", 512),
            spec.get("head_dropout", 0.0),
        )
        return cls(backbone, head, spec)

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
        """(B, 3, H, W) -> (B, num_features) pooled backbone features."""
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
