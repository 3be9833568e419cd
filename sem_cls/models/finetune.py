"""Fine-tuning schedules: which backbone stages learn, from when, at which learning rate.

`model.freeze` is `all` (a linear probe: only the head learns), `none` (everything learns) or a
number N: the last N stages of the backbone learn, the earlier ones stay as pretrained, with
their BatchNorm statistics frozen. Stages are timm's coarse parameter groups (stem, then one
group per block stage), so the same number means the same thing for any timm backbone.
"""

import math

from torch import nn

HEADS = ("linear", "mlp")


def trainable_stage_count(freeze, stage_count: int) -> int:
    """How many of the last stages learn: 0 for `all`/true, every one for `none`/false."""
    if freeze is True or freeze == "all":
        return 0
    if freeze is False or freeze == "none":
        return stage_count
    if isinstance(freeze, int) and not isinstance(freeze, bool) and freeze >= 0:
        return min(freeze, stage_count)
    # The config schema admits all | none | N >= 0 only.
    raise ValueError(f"freeze={freeze!r} is not 'all', 'none' or a number of stages.")


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Parameter names per stage, input side first, from timm's coarse grouping."""
    from timm.models import group_parameters  # here: a headless model needs no timm

    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[key] for key in sorted(groups)]


def freeze_stages(backbone: nn.Module, stages: list[list[str]], learning: int) -> list[str]:
    """Freeze all but the last `learning` stages (BatchNorm included); their names, which
    learn, are returned."""
    frozen = [name for stage in stages[: len(stages) - learning] for name in stage]
    if frozen:
        # Modules owning frozen parameters; timm swaps their BatchNorms for FrozenBatchNorm2d.
        import timm.utils

        timm.utils.freeze(backbone, sorted({name.rpartition(".")[0] for name in frozen}))
    return [name for stage in stages[len(stages) - learning :] for name in stage]


def make_head(kind: str, in_features: int, num_classes: int, hidden: int, dropout: float):
    if kind not in HEADS:  # the config schema admits HEADS only
        raise ValueError(f"head={kind!r} is not one of {list(HEADS)}.")
    output = nn.Linear(hidden if kind == "mlp" else in_features, num_classes)
    # Linear-probe init for the output layer: small weights, zero bias.
    nn.init.normal_(output.weight, std=0.01)
    nn.init.zeros_(output.bias)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), output)
    return nn.Sequential(nn.Dropout(dropout), output) if dropout else output


def backbone_param_groups(backbone: nn.Module, lr: float, weight_decay: float, layer_decay):
    """Optimizer groups of the backbone's learning parameters; with `layer_decay`, each layer's
    learning rate is lr * layer_decay^(layers above it), so early layers move least."""
    if not layer_decay:
        params = [p for p in backbone.parameters() if p.requires_grad]
        return [{"params": params}] if params else []
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


def warmup_cosine(warmup_epochs: int, cosine: bool, max_epochs: int):
    """Learning-rate factor per epoch: linear warmup to 1, then cosine decay to 0 (or flat)."""

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if not cosine:
            return 1.0
        progress = (epoch - warmup_epochs) / max(1, max_epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
