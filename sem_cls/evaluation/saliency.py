"""Grad-CAM: where in an SEM image the model found the class it chose, for a handful of test
images, drawn as one PNG. A picture to sanity-check a model (specimen, not scale bar or text),
not a measurement."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sem_cls.data.samples import normalised  # noqa: E402


def grad_cam(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) maps in [0, 1] of the evidence for each image's top class, and (B, C) class
    probabilities. Gradients of the top logit weigh the last feature map's channels (Selvaraju
    et al. 2017); with a linear head on average-pooled features this is exactly CAM."""
    model.eval()
    config = model.data_config
    images = normalised(images, config["mean"], config["std"])  # uint8 (B, H, W, 3) -> (B, 3, H, W)
    with torch.no_grad():
        feature_map = model.backbone.forward_features(images)  # (B, 3, H, W) -> (B, C, h, w)
    if isinstance(feature_map, tuple):  # InceptionV3 with its auxiliary classifier
        feature_map = feature_map[0]
    feature_map = feature_map.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(model.backbone.forward_head(feature_map, pre_logits=True))
        logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum().backward()
    weights = feature_map.grad.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True)).detach()  # (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8)
    return cam, logits.detach().softmax(dim=1)


def as_seen(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 pixels, as the eval transform hands them over -> (H, W, 3) in [0, 1]:
    the image as the model saw it."""
    return image.cpu().float() / 255


def overlay(shown: torch.Tensor, cam: torch.Tensor, alpha: float = 0.35) -> np.ndarray:
    """(H, W, 3) uint8: the Grad-CAM map (jet, red: high) over the image, as write_saliency
    draws it."""
    heat = matplotlib.colormaps["jet"](cam.cpu().numpy())[..., :3]
    blended = (1 - alpha) * shown.numpy() + alpha * heat
    return (blended * 255).round().astype(np.uint8)


def spread_over_classes(labels: list[int], count: int) -> list[int]:
    """Indices of `count` images, the first of every class, then the second, ..."""
    rank, seen = [], {}
    for label in labels:
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    return sorted(range(len(labels)), key=lambda i: (rank[i], labels[i]))[:count]


def write_saliency(path: Path, model, datamodule, samples, count: int, title: str) -> Path:
    """Grad-CAM over `count` of `samples` (spread over classes), as the model sees them: info bar
    cut, resized and centre-cropped."""
    chosen = [samples[i] for i in spread_over_classes([s.label for s in samples], count)]
    dataset = datamodule.image_dataset(chosen)
    images = torch.stack([dataset[i]["image"] for i in range(len(chosen))])  # (B, H, W, 3)
    device = next(model.parameters()).device
    cams, probs = grad_cam(model, images.to(device))

    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.8 * columns, 3.3 * rows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    names = model.class_names
    for ax, sample, image, cam, prob in zip(axes.flat, chosen, images, cams, probs, strict=False):
        ax.imshow(as_seen(image).numpy())
        ax.imshow(cam.cpu().numpy(), cmap="jet", alpha=0.35, vmin=0, vmax=1)
        top = int(prob.argmax())
        ax.set_title(
            f"true: {names[sample.label]}\npredicted: {names[top]} ({float(prob[top]):.2f})",
            fontsize=8,
            color="black" if top == sample.label else "tab:red",
        )
    fig.suptitle(f"{title}\nGrad-CAM: evidence for the predicted class (red: high)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
