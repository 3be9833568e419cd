"""Training-time augmentation suited to SEM images, which have no up, no left and no colour.

A specimen looks the same flipped or turned by 90 degrees; magnification varies, which random
resized crops imitate; brightness, contrast and detector noise vary between sessions.
"""

import torch
from timm.data.transforms import str_to_interp_mode
from torch import nn
from torchvision.transforms import v2


class RandomRot90(nn.Module):
    """Turn by 0, 90, 180 or 270 degrees, chosen at random: exact, no interpolation."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(4, ()))
        return image if turns == 0 else torch.rot90(image, turns, dims=(-2, -1))


def sem_train_transform(
    data_config: dict,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flips: bool = True,
    rotate90: bool = True,
    brightness: float = 0.1,
    contrast: float = 0.1,
    noise: float = 0.02,
) -> v2.Compose:
    """PIL image -> augmented, normalised (3, H, W) tensor at the backbone's input size."""
    size = tuple(data_config["input_size"][-2:])
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            size,
            scale=tuple(scale),
            ratio=tuple(ratio),
            interpolation=str_to_interp_mode(data_config["interpolation"]),
            antialias=True,
        ),
    ]
    if flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rotate90:
        steps.append(RandomRot90())  # square crops, so any turn keeps the size
    if brightness or contrast:
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data_config["mean"], data_config["std"]),
    ]
    if noise:
        steps.append(v2.GaussianNoise(sigma=noise, clip=False))
    return v2.Compose(steps)
