"""What the loaders read: a `Sample` per image, and the datasets over samples (images or cached
features), each item a dict that says what it holds and its index in the set, by which
predictions gathered from every DDP rank are put back in the set's order (`in_set_order`)."""

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sem_cls.data.images import DEFAULT_MAX_PIXELS, open_image, scale_box


class Sample(NamedTuple):
    """One image as the loaders see it: where, which class, what to keep, what it holds."""

    path: Path  # or a binary file object: an image read from a store
    label: int
    crop_box: tuple[int, int, int, int]  # in original pixels
    size: tuple[int, int]  # original (width, height)
    sha256: str


class SEMImageDataset(Dataset):
    """Reads an image, crops its recorded info-bar box, applies the backbone's transform:
    {"image": (H, W, 3) uint8 (the eval transform) or (3, H, W) float (augmented),
    "label": int, "index": int}.

    JPEGs are decoded at the smallest power-of-two reduction that keeps `min_side` pixels, which
    is several times cheaper than decoding 1024x768 and resizing away most of it.
    """

    def __init__(self, samples: list[Sample], transform, min_side: int = 0, max_pixels=None):
        self.samples = samples
        self.transform = transform
        self.min_side = min_side
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image, size = open_image(sample.path, "RGB", self.min_side, self.max_pixels)
        box = scale_box(sample.crop_box, size, image.size)
        if box != (0, 0, *image.size):
            image = image.crop(box)
        return {"image": self.transform(image), "label": sample.label, "index": index}


class FeatureDataset(Dataset):
    """{"features": (num_features,), "label": int, "index": int} from a memory-mapped
    (N, num_features) matrix."""

    def __init__(self, features: np.ndarray, labels: list[int]):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        features = torch.from_numpy(np.array(self.features[index]))
        return {"features": features, "label": self.labels[index], "index": index}


class EvalTransform:
    """timm's evaluation transform for a centre-cropped square input (resize the short side to
    input/crop_pct, centre crop), in PIL alone: timm's own imports torchvision, whose import
    costs a one-image prediction more than torch's. It hands over (H, W, 3) uint8 pixels, a
    quarter of float32's bytes between processes; `normalised` scales a whole batch (the
    OpenVINO engine does it inside its model)."""

    def __init__(self, data_config: dict):
        self.size = data_config["input_size"][-1]
        self.short_side = math.floor(self.size / data_config["crop_pct"])
        self.resample = getattr(Image.Resampling, data_config["interpolation"].upper())
        self.mean = tuple(data_config["mean"])
        self.std = tuple(data_config["std"])

    def __repr__(self) -> str:
        # Part of the feature cache's key: what the transform does, never where it sits. The
        # resize over the crop's box rounds a few pixels otherwise than resize-then-crop did.
        return (
            f"EvalTransform(size={self.size}, short_side={self.short_side}, "
            f"resample={self.resample.name}, mean={list(self.mean)}, std={list(self.std)}, "
            "resize=box, pixels=uint8)"
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        # torchvision.transforms.Resize(int) on a PIL image: the long side truncated.
        if width <= height:
            size = (self.short_side, int(self.short_side * height / width))
        else:
            size = (int(self.short_side * width / height), self.short_side)
        left = int(round((size[0] - self.size) / 2.0))  # torchvision's CenterCrop
        top = int(round((size[1] - self.size) / 2.0))
        # Only the centre crop is resized (PIL's box, in source pixels): the same filter at the
        # same scale, on half the output pixels of resizing the whole image and cropping.
        sx, sy = width / size[0], height / size[1]
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        image = image.resize((self.size, self.size), self.resample, box=box)
        return pixels(image)


def pixels(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as an (H, W, 3) uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 pixels -> (B, 3, H, W) float32 model input, scaled to 0-1 and
    normalised by the backbone's mean and std, channels_last in memory. Float images
    (augmented ones, normalised already) are returned as they are."""
    if images.is_floating_point():
        return images
    scale = 1 / (255 * torch.tensor(std, device=images.device))
    shift = torch.tensor(mean, device=images.device) / torch.tensor(std, device=images.device)
    # (B, H, W, 3) -> (B, 3, H, W): a view, whose memory is channels_last already.
    return (images.float() * scale - shift).permute(0, 3, 1, 2)


def eval_preprocessing(data_config: dict):
    """The backbone's evaluation transform (resize + centre crop, to (H, W, 3) uint8 pixels) and
    the side JPEGs are decoded at for it; shared by the loaders and by prediction, so both see
    the same pixels."""
    square = data_config["input_size"][-1] == data_config["input_size"][-2]
    if square and data_config.get("crop_mode", "center") == "center":
        transform = EvalTransform(data_config)
    else:  # other crop modes and non-square inputs: timm's own, pixels before it normalises
        import timm.data
        from torchvision import transforms

        steps = timm.data.create_transform(**data_config, is_training=False).transforms
        keep = [t for t in steps if not isinstance(t, transforms.Normalize | transforms.ToTensor)]
        keep = [t for t in keep if type(t).__name__ != "MaybeToTensor"]
        transform = transforms.Compose([*keep, pixels])
    # The transform resizes the short side to input/crop_pct; 10% more covers a typical info
    # bar (8% of the height), so the crop is still downsampled, not blown up.
    resized_side = data_config["input_size"][-1] / data_config["crop_pct"]
    return transform, int(resized_side * 1.1)


def in_set_order(module, outputs: list[dict]) -> dict[str, torch.Tensor]:
    """Step outputs of an evaluation pass ({"index": (B,), name: (B, ...)}), gathered from every
    rank of `module` (a LightningModule) and placed by sample index: name -> (N, ...), each image
    once. Under DDP a DistributedSampler pads the ranks' shares with repeats of a few images;
    they land on their own row again (as DINOv2's linear evaluation gathers)."""
    if not outputs:
        return {}
    local = {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
    gathered = {key: module.all_gather(value) for key, value in local.items()}
    if module.trainer.world_size > 1:  # (world, n, ...) -> (world * n, ...)
        gathered = {key: value.flatten(0, 1) for key, value in gathered.items()}
    index = gathered.pop("index").long()
    size = int(index.max()) + 1
    return {
        key: value.new_zeros((size, *value.shape[1:])).index_copy_(0, index, value)
        for key, value in gathered.items()
    }
